"""Attack round 2: shared stores with several instances, the v2 verbs under stress, the
ingest adapter's races, misbehaving admissions, and calls from threads.

Each test is named after the contract behaviour it asserts (docs/contract.md, with the
decisions of docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import (
    CodecError,
    LoadCancelled,
    Prefetcher,
    PrefetcherClosed,
    Served,
    Source,
    Status,
    StoreError,
    WrongThreadError,
)
from prefetch_ingest.ingest import IngestPrefetcher
from prefetch_ingest.redis import RedisStore
from tests.helpers import FakeClock, GatedLoader
from tests.redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.anyio

redis_server = redis_server_fixture()

HUGE_INT = 10**5000  # str() of it raises ValueError (Python's 4300-digit limit)


def asyncio_only(backend: str) -> None:
    if backend != "asyncio":
        pytest.skip("asyncio only (RedisStore, or asyncio-specific behaviour)")


async def _value(key: Any) -> Any:
    return ("v", key)


async def _fails(key: Any) -> Any:
    raise ValueError(f"load of {type(key).__name__} failed")


def _in_thread(call: Callable[[], Any]) -> BaseException | Any:
    """Run ``call`` in a fresh thread; return what it returned or raised."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(call())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    return out[0]


# ---------------------------------------------------------------------------------------
# misbehaving admissions


class _Admission:
    """A custom Admission: the limit is ``value``; hooks can be made to misbehave."""

    def __init__(self, value: Any = None) -> None:
        self.value = value
        self.started_raises = False
        self.ended_raises = False

    def limit(self) -> Any:
        return self.value

    def load_started(self, background: bool) -> None:
        if self.started_raises:
            raise RuntimeError("load_started broke")

    def load_ended(self, background: bool) -> None:
        if self.ended_raises:
            raise RuntimeError("load_ended broke")

    async def run(self, changed: Callable[[], None]) -> None:
        return None


async def test_an_admission_calling_changed_from_another_thread_starts_the_queued_load() -> None:
    """run() raises the limit and calls changed() from a worker thread: the queued load
    starts and completes (or the call is refused) — never a RUNNING load with no task."""
    go = anyio.Event()

    class FromThread(_Admission):
        async def run(self, changed: Callable[[], None]) -> None:
            await go.wait()

            def raise_limit() -> None:
                self.value = None
                # a refusal (WrongThreadError) is acceptable, a stuck load is not
                with contextlib.suppress(WrongThreadError):
                    changed()

            await anyio.to_thread.run_sync(raise_limit)
            called.set()
            await anyio.sleep_forever()

    called = anyio.Event()
    async with Prefetcher(_value, admission=FromThread(0)) as pf:
        assert pf.prefetch("k") is True
        assert (await pf.status("k")).status is Status.PENDING
        go.set()
        with anyio.fail_after(10):
            await called.wait()  # changed() has been called (or refused) from the thread
            # a get promotes it at the latest; whatever happened, it must end
            assert await pf.get("k") == ("v", "k")
            snap = await pf.wait("k")
        assert snap.status is Status.COMPLETED


async def test_an_admission_whose_load_started_raises_never_holds_back_a_get() -> None:
    """'A failing admission pauses speculation, never a demand': get still runs the load."""
    adm = _Admission(None)
    adm.started_raises = True
    with capture_logs() as logs:
        async with Prefetcher(_value, admission=adm) as pf:
            with anyio.fail_after(10):
                assert await pf.get("k") == ("v", "k")
    (event,) = [e for e in logs if e["event"] == "prefetch.admission_failed"]
    assert "load_started broke" in event["error"]  # the admission's bug is logged


async def test_prefetch_with_an_admission_whose_load_started_raises_never_raises() -> None:
    """prefetch never raises because of the load; the key must not be left RUNNING with no
    task: wait() ends."""
    adm = _Admission(None)
    adm.started_raises = True
    async with Prefetcher(_value, admission=adm) as pf:
        pf.prefetch("k")
        with anyio.fail_after(10):
            snap = await pf.wait("k")
        assert snap.status.terminal or snap.status is Status.NOT_STARTED


async def test_an_admission_whose_load_ended_raises_still_frees_the_slot_for_the_next() -> None:
    adm = _Admission(1)
    adm.ended_raises = True
    with capture_logs() as logs:
        async with Prefetcher(_value, admission=adm) as pf:
            assert pf.prefetch("a") and pf.prefetch("b")
            with anyio.fail_after(10):
                assert (await pf.wait("a")).status is Status.COMPLETED
                assert (await pf.wait("b")).status is Status.COMPLETED
    assert any("load_ended broke" in e.get("error", "") for e in logs)


@pytest.mark.parametrize("bad", [1.5, True, -1, "2", 2.0])
async def test_an_admission_limit_of_the_wrong_kind_pauses_background_never_a_get(
    bad: Any,
) -> None:
    async with Prefetcher(_value, admission=_Admission(bad)) as pf:
        assert pf.prefetch("k") is True
        assert (await pf.status("k")).status is Status.PENDING
        with anyio.fail_after(10):
            assert await pf.get("k") == ("v", "k")
        assert pf.stats().load_successes == 1


async def test_an_admission_whose_run_raises_leaves_the_prefetcher_working() -> None:
    class Raises(_Admission):
        async def run(self, changed: Callable[[], None]) -> None:
            raise RuntimeError("run broke")

    async with Prefetcher(_value, admission=Raises(None)) as pf:
        await anyio.wait_all_tasks_blocked()
        assert pf.prefetch("k")
        with anyio.fail_after(10):
            assert (await pf.wait("k")).status is Status.COMPLETED
        assert await pf.get("j") == ("v", "j")


class _OddBase(BaseException):
    pass


async def test_an_admission_whose_run_raises_a_base_exception_does_not_break_the_block() -> None:
    """Not KeyboardInterrupt/SystemExit: the admission failing must not cancel the body
    nor make the block leave with an ExceptionGroup."""

    class Raises(_Admission):
        async def run(self, changed: Callable[[], None]) -> None:
            raise _OddBase("run broke badly")

    reached = False
    with capture_logs() as logs:
        async with Prefetcher(_value, admission=Raises(None)) as pf:
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                assert await pf.get("k") == ("v", "k")
            reached = True
    assert reached
    (event,) = [e for e in logs if e["event"] == "prefetch.admission_failed"]
    assert "run broke badly" in event["error"]


# ---------------------------------------------------------------------------------------
# wrap with odd arguments


async def test_wrap_used_on_a_method_passes_self_like_the_function_would() -> None:
    async with Prefetcher() as pf:

        class Repo:
            def __init__(self, name: str) -> None:
                self.name = name

            @pf.wrap
            async def fetch(self, x: int) -> tuple[str, int]:
                return (self.name, x)

        repo, other = Repo("repo"), Repo("other")
        with anyio.fail_after(10):
            assert await repo.fetch(1) == ("repo", 1)
            assert await other.fetch(1) == ("other", 1)  # self is part of the key
            assert await Repo.fetch(repo, 1) == ("repo", 1)  # the same key, a hit
        assert repo.fetch.key_of(1) == (repo, 1)
        assert (pf.stats().misses, pf.stats().hits) == (2, 1)


async def test_wrap_with_a_key_function_that_raises_propagates_and_leaves_no_trace() -> None:
    async with Prefetcher() as pf:

        def key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            raise LookupError("no key for you")

        @pf.wrap(key=key)
        async def f(x: int) -> int:
            return x

        with pytest.raises(LookupError):
            await f(1)
        with pytest.raises(LookupError):
            f.prefetch(1)
        with pytest.raises(LookupError):
            await f.serve(1)
        with pytest.raises(LookupError):
            await f.cancel(1)
        s = pf.stats()
        assert (s.total, s.misses, s.prefetches, s.hits) == (0, 0, 0, 0)


async def test_wrap_with_a_key_function_returning_unhashable_is_a_type_error_leaving_no_trace() -> (
    None
):
    async with Prefetcher() as pf:

        @pf.wrap(key=lambda args, kwargs: list(args))  # type: ignore[arg-type, return-value]
        async def f(x: int) -> int:
            return x

        for call in (lambda: f(1), lambda: f.serve(1), lambda: f.status(1), lambda: f.cancel(1)):
            with pytest.raises(TypeError, match="key"):
                await call()
        with pytest.raises(TypeError, match="key"):
            f.prefetch(1)
        s = pf.stats()
        assert (s.total, s.misses, s.prefetches) == (0, 0, 0)


async def test_wrap_kwargs_in_any_order_are_one_key_and_timeout_kwargs_go_to_the_function() -> None:
    runs: list[Any] = []
    async with Prefetcher() as pf:

        @pf.wrap
        async def f(
            a: int, *, b: int = 0, timeout: float = 0.0, force_refresh: bool = False
        ) -> Any:
            runs.append((a, b, timeout, force_refresh))
            return (a, b, timeout, force_refresh)

        assert await f(1, b=2, timeout=3.0) == (1, 2, 3.0, False)
        assert await f(1, timeout=3.0, b=2) == (1, 2, 3.0, False)
        assert await f(1, force_refresh=True) == (1, 0, 0.0, True)
        assert len(runs) == 2
        assert (await pf.status(f.key_of(1, timeout=3.0, b=2))).status is Status.COMPLETED


# ---------------------------------------------------------------------------------------
# prefetch(delay=...) races with an injected clock


async def test_a_delayed_prefetch_starts_once_the_injected_clock_passes_its_delay() -> None:
    clock = FakeClock()
    load = GatedLoader(gated=False)
    async with Prefetcher(load, clock=clock) as pf:
        assert pf.prefetch("k", delay=0.01)
        assert (await pf.status("k")).status is Status.PENDING
        clock.advance(1.0)
        with anyio.fail_after(10):
            snap = await pf.wait("k")
        assert snap.status is Status.COMPLETED and load.calls == {"k": 1}


async def test_a_delayed_prefetch_invalidated_then_delayed_again_runs_only_the_second() -> None:
    clock = FakeClock()

    async def first(key: Any) -> Any:
        return "first"

    async def second(key: Any) -> Any:
        return "second"

    async with Prefetcher(clock=clock) as pf:
        assert pf.prefetch("k", first, "k", delay=5.0)
        assert await pf.invalidate("k") is True
        assert (await pf.status("k")).status is Status.NOT_STARTED
        assert pf.prefetch("k", second, "k", delay=5.0)
        assert pf.prefetch("k", first, "k", delay=0.0) is False  # deduplicated
        clock.advance(10.0)
        with anyio.fail_after(10):
            assert await pf.get("k") == "second"
        assert pf.stats().load_successes == 1


async def test_a_delayed_prefetch_cancelled_after_its_clock_passed_runs_nothing() -> None:
    clock = FakeClock()
    load = GatedLoader()
    async with Prefetcher(load, clock=clock, max_concurrency=1) as pf:
        assert pf.prefetch("busy")
        await load.started.wait()
        assert pf.prefetch("d", delay=0.5)
        clock.advance(1.0)
        assert [s.key for s in pf.in_flight()] == ["busy", "d"]  # d queued behind busy
        assert await pf.cancel("d") is True
        load.release()
        with anyio.fail_after(10):
            assert (await pf.wait("busy")).status is Status.COMPLETED
            assert (await pf.wait("d")).status is Status.NOT_STARTED
        assert "d" not in load.calls
        assert pf.stats().cancelled == 1


async def test_a_delayed_prefetch_queued_behind_a_cancelled_load_starts_when_its_task_ends() -> (
    None
):
    clock = FakeClock()
    load = GatedLoader()
    async with Prefetcher(load, clock=clock, max_concurrency=1) as pf:
        assert pf.prefetch("busy")
        await load.started.wait()
        assert pf.prefetch("d", delay=0.5)
        clock.advance(1.0)
        await pf.status("d")  # the clock passed: it competes for admission now
        assert await pf.cancel("busy") is True
        load.release()
        with anyio.fail_after(10):
            assert (await pf.wait("d")).status is Status.COMPLETED
        assert load.calls == {"busy": 1, "d": 1}


async def test_close_with_a_delayed_prefetch_whose_clock_passed_but_timer_not_fired() -> None:
    clock = FakeClock()
    load = GatedLoader(gated=False)
    pf = Prefetcher(load, clock=clock)
    async with pf:
        assert pf.prefetch("k", delay=3600.0)
        clock.advance(7200.0)
    assert load.calls == {}
    assert pf.stats().cancelled == 1


# ---------------------------------------------------------------------------------------
# shutdown_grace with loads that finish, fail or spawn during the grace


async def test_a_load_that_prefetches_during_the_grace_gets_closed_and_still_finishes() -> None:
    gate = anyio.Event()
    spawned: list[str] = []
    child_runs: list[str] = []
    results: dict[str, Any] = {}

    async def child(key: Any) -> Any:
        child_runs.append(key)
        return "child"

    pf = Prefetcher(shutdown_grace=10.0)

    async def parent(key: Any) -> Any:
        await gate.wait()
        try:
            pf.prefetch("child", child, "child")
            spawned.append("started")
        except PrefetcherClosed:
            spawned.append("closed")
        try:
            await pf.get("cold", child, "cold")
        except PrefetcherClosed:
            spawned.append("get closed")
        return "parent"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, pf:

            async def waiter() -> None:
                results["p"] = await pf.get("p", parent, "p")

            outer.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            gate.set()  # the load resumes only once the block is being left
    assert results == {"p": "parent"}
    assert spawned == ["closed", "get closed"]
    assert child_runs == []


async def test_a_load_that_fails_during_the_grace_gives_its_waiter_its_own_exception() -> None:
    gate = anyio.Event()
    results: dict[str, Any] = {}

    async def load(key: Any) -> Any:
        await gate.wait()
        raise KeyError("failed in the grace")

    pf = Prefetcher(shutdown_grace=10.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, pf:

            async def waiter() -> None:
                try:
                    await pf.get("p", load, "p")
                except BaseException as exc:
                    results["p"] = exc

            outer.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert isinstance(results["p"], KeyError)


async def test_a_hit_during_the_grace_is_served_to_a_running_load() -> None:
    gate = anyio.Event()
    results: dict[str, Any] = {}
    pf = Prefetcher(_value, shutdown_grace=10.0)

    async def load(key: Any) -> Any:
        await gate.wait()
        return ("parent got", await pf.get("warm"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer, pf:
            await pf.get("warm")

            async def waiter() -> None:
                results["p"] = await pf.get("p", load, "p")

            outer.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert results["p"] == ("parent got", ("v", "warm"))


# ---------------------------------------------------------------------------------------
# keys whose rendering raises (a huge int): the load's failure, cancel, logging


async def test_a_failing_load_of_a_huge_int_key_fails_only_its_waiters(anyio_backend: str) -> None:
    """Nothing escapes the load's task: on asyncio no task exception reaches the loop's
    exception handler, on trio the task group is not broken."""
    import gc

    handled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop() if anyio_backend == "asyncio" else None
    if loop is not None:
        loop.set_exception_handler(lambda _loop, context: handled.append(context))
    try:
        with anyio.fail_after(10):
            async with Prefetcher(_fails) as pf:
                with pytest.raises(ValueError, match="load of int failed"):
                    await pf.get(HUGE_INT)
                assert (await pf.status(HUGE_INT)).status is Status.FAILED
                assert await pf.get("other", _value, "other") == ("v", "other")
        gc.collect()
    finally:
        if loop is not None:
            loop.set_exception_handler(None)
    assert [c.get("message") for c in handled] == []


async def test_cancel_of_a_huge_int_key_gives_its_waiters_load_cancelled() -> None:
    load = GatedLoader()
    caught: list[BaseException] = []
    async with Prefetcher(load) as pf:
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                try:
                    await pf.get(HUGE_INT)
                except BaseException as exc:
                    caught.append(exc)

            tg.start_soon(waiter)
            await load.started.wait()
            assert await pf.cancel(HUGE_INT) is True
        assert len(caught) == 1 and isinstance(caught[0], LoadCancelled)
        assert (await pf.status(HUGE_INT)).status is Status.NOT_STARTED


async def test_a_long_int_key_is_logged_bounded() -> None:
    key = 10**1000
    with capture_logs() as logs:
        async with Prefetcher(_fails) as pf:
            with pytest.raises(ValueError):
                await pf.get(key)
    (event,) = [e for e in logs if e["event"] == "prefetch.failed"]
    assert len(str(event["key"])) <= 200


# ---------------------------------------------------------------------------------------
# the ingest adapter


class _Pipeline:
    def __init__(self, stats: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()
        self.stats = stats or (lambda: {"rows": 1})

    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        self.calls.append((project_id, run_id))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.stats()


def _nested(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for _ in range(depth):
        d = {"a": d}
    return d


async def test_ingest_deeply_nested_stats_fail_with_codec_error() -> None:
    pipeline = _Pipeline(lambda: _nested(100_000))
    async with IngestPrefetcher(pipeline) as ingest:
        with pytest.raises(CodecError):
            await ingest.ingest("p", "r")
        status = await ingest.status("p", "r")
        assert status.status is Status.FAILED
        assert status.error is not None and status.error.startswith("CodecError")


async def test_ingest_stats_with_nan_are_a_codec_error() -> None:
    pipeline = _Pipeline(lambda: {"ratio": float("nan")})
    async with IngestPrefetcher(pipeline) as ingest:
        with pytest.raises(CodecError):
            await ingest.ingest("p", "r")


async def test_ingest_huge_stats_are_served_and_reported() -> None:
    big = {f"k{i}": i for i in range(100_000)}
    pipeline = _Pipeline(lambda: big)
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r")
        with anyio.fail_after(10):
            result = await ingest.ingest("p", "r")
        assert result.source in ("joined", "hit") and len(result.stats) == 100_000
        d = (await ingest.status("p", "r")).to_dict()
        assert d["status"] == "completed" and len(d["stats"]) == 100_000


async def test_ingest_persisted_stats_raising_a_base_exception_goes_on_as_if_nothing_persisted() -> (  # noqa: E501
    None
):
    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        raise _OddBase("database driver exploded")

    pipeline = _Pipeline()
    async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ingest:
        status = await ingest.status("p", "r")
        assert status.status is Status.NOT_STARTED
        result = await ingest.ingest("p", "r")
        assert result.source == "ran" and result.stats == {"rows": 1}


async def test_ingest_background_run_with_a_hanging_persisted_stats_can_be_cancelled() -> None:
    entered = anyio.Event()

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        entered.set()
        await anyio.sleep_forever()
        return None

    pipeline = _Pipeline()
    async with IngestPrefetcher(pipeline, persisted_stats=None) as ingest:
        ingest._persisted_stats = persisted  # only the background run sees it hang
        assert ingest.after_query("p", "r")
        with anyio.fail_after(10):
            await entered.wait()
            assert (await ingest.status("p", "r")).status is Status.RUNNING
            assert await ingest.cancel("p", "r") is True
            ingest._persisted_stats = None
            assert (await ingest.status("p", "r")).status is Status.NOT_STARTED
            assert ingest.after_query("p", "r") is True
            result = await ingest.ingest("p", "r")
        assert result.source == "joined" and pipeline.calls == [("p", "r")]


async def test_ingest_click_waiting_on_a_hanging_persisted_stats_is_cancelled_alone() -> None:
    entered = anyio.Event()

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        entered.set()
        await anyio.sleep_forever()
        return None

    pipeline = _Pipeline()
    async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ingest:
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest.ingest, "p", "r")
                await entered.wait()
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        s = ingest.stats()
        assert (s.total, s.misses, s.waiters) == (0, 0, 0)
        assert pipeline.calls == []


async def test_ingest_after_query_click_cancel_race_leaves_the_run_restartable() -> None:
    pipeline = _Pipeline()
    pipeline.gate = anyio.Event()
    outcomes: list[Any] = []
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r")
        async with anyio.create_task_group() as tg:

            async def click() -> None:
                try:
                    outcomes.append(await ingest.ingest("p", "r"))
                except BaseException as exc:
                    outcomes.append(exc)

            tg.start_soon(click)
            tg.start_soon(click)
            await pipeline.started.wait()
            await anyio.wait_all_tasks_blocked()
            assert await ingest.cancel("p", "r") is True
            assert ingest.after_query("p", "r") is True  # a new run, right away
            assert await ingest.cancel("p", "r") is True
            assert await ingest.cancel("p", "r") is False
        assert len(outcomes) == 2 and all(isinstance(o, LoadCancelled) for o in outcomes)
        assert (await ingest.status("p", "r")).status is Status.NOT_STARTED
        pipeline.gate.set()
        with anyio.fail_after(10):
            result = await ingest.ingest("p", "r")
        assert result.source == "ran"


async def test_ingest_watch_sees_a_cancel_then_a_new_run_to_completion() -> None:
    pipeline = _Pipeline()
    pipeline.gate = anyio.Event()
    seen: list[str] = []
    async with IngestPrefetcher(pipeline) as ingest:
        assert ingest.after_query("p", "r")
        await pipeline.started.wait()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def watcher() -> None:
                    async for st in ingest.watch("p", "r"):
                        seen.append(st.status.value)

                tg.start_soon(watcher)
                await anyio.wait_all_tasks_blocked()
                assert await ingest.cancel("p", "r")
                await anyio.wait_all_tasks_blocked()
                pipeline.gate.set()
                assert ingest.after_query("p", "r")
        assert seen[0] == "running" and "not_started" in seen and seen[-1] == "completed"


async def test_ingest_verbs_from_a_worker_thread_raise_wrong_thread_and_leave_no_trace() -> None:
    pipeline = _Pipeline()
    async with IngestPrefetcher(pipeline) as ingest:

        def calls() -> list[str]:
            failed: list[str] = []
            for name, make in (
                ("ingest", lambda: ingest.ingest("p", "r")),
                ("status", lambda: ingest.status("p", "r")),
                ("cancel", lambda: ingest.cancel("p", "r")),
            ):
                try:
                    asyncio.run(make())
                except WrongThreadError:
                    failed.append(name)
            try:
                asyncio.run(anext(ingest.watch("p", "r")))
            except WrongThreadError:
                failed.append("watch")
            if ingest.after_query("p", "r") is False:
                failed.append("after_query")
            return failed

        assert await anyio.to_thread.run_sync(calls) == [
            "ingest",
            "status",
            "cancel",
            "watch",
            "after_query",
        ]
        s = ingest.stats()
        assert (s.total, s.misses, s.prefetches, s.watchers) == (0, 0, 0, 0)
        assert pipeline.calls == []


# ---------------------------------------------------------------------------------------
# calls from threads on every verb


async def test_serve_watch_and_wrapped_verbs_from_a_plain_thread_raise_wrong_thread() -> None:
    async with Prefetcher(_value) as pf:

        @pf.wrap
        async def f(x: int) -> int:
            return x

        w = pf.watch("k")

        def calls() -> list[str]:
            failed: list[str] = []
            for name, make in (
                ("serve", lambda: pf.serve("k")),
                ("get", lambda: pf.get("k")),
                ("wait", lambda: pf.wait("k")),
                ("watch", lambda: w.__anext__()),
                ("wrapped", lambda: f(1)),
                ("wrapped.serve", lambda: f.serve(1)),
                ("wrapped.status", lambda: f.status(1)),
                ("wrapped.cancel", lambda: f.cancel(1)),
                ("wrapped.invalidate", lambda: f.invalidate(1)),
            ):
                try:
                    asyncio.run(make())
                except WrongThreadError:
                    failed.append(name)
            for name, call in (
                ("wrapped.prefetch", lambda: f.prefetch(1)),
                ("watch()", lambda: pf.watch("j")),
                ("prefetch delay", lambda: pf.prefetch("d", delay=1.0)),
            ):
                try:
                    call()
                except WrongThreadError:
                    failed.append(name)
            return failed

        assert await anyio.to_thread.run_sync(calls) == [
            "serve",
            "get",
            "wait",
            "watch",
            "wrapped",
            "wrapped.serve",
            "wrapped.status",
            "wrapped.cancel",
            "wrapped.invalidate",
            "wrapped.prefetch",
            "watch()",
            "prefetch delay",
        ]
        s = pf.stats()
        assert (s.total, s.misses, s.prefetches, s.watchers, s.waiters) == (0, 0, 0, 0, 0)
        # and the loop still works
        assert await pf.get("k") == ("v", "k")


async def test_every_verb_through_from_thread_run_works() -> None:
    load = GatedLoader()
    async with Prefetcher(load) as pf:

        @pf.wrap
        async def f(x: int) -> int:
            return x * 2

        def worker() -> dict[str, Any]:
            out: dict[str, Any] = {}
            out["prefetch"] = anyio.from_thread.run_sync(pf.prefetch, "k")
            out["in_flight"] = [s.key for s in anyio.from_thread.run_sync(pf.in_flight)]
            out["status"] = anyio.from_thread.run(pf.status, "k").status
            out["cancel"] = anyio.from_thread.run(pf.cancel, "k")
            anyio.from_thread.run_sync(load.release)
            out["serve"] = anyio.from_thread.run(pf.serve, "k").source
            out["serve2"] = anyio.from_thread.run(pf.serve, "k").source
            out["wait"] = anyio.from_thread.run(pf.wait, "k").status
            out["wrapped"] = anyio.from_thread.run(f, 21)
            out["wrapped.prefetch"] = anyio.from_thread.run_sync(f.prefetch, 21)
            out["invalidate"] = anyio.from_thread.run(pf.invalidate, "k")
            return out

        with anyio.fail_after(10):
            out = await anyio.to_thread.run_sync(worker)
        assert out == {
            "prefetch": True,
            "in_flight": ["k"],
            "status": Status.RUNNING,
            "cancel": True,
            "serve": Source.RAN,
            "serve2": Source.HIT,
            "wait": Status.COMPLETED,
            "wrapped": 42,
            "wrapped.prefetch": False,
            "invalidate": True,
        }


async def test_a_serve_hit_from_another_thread_is_served_like_a_get_hit() -> None:
    async with Prefetcher(_value) as pf:
        await pf.get("k")
        got = await anyio.to_thread.run_sync(lambda: _in_thread(lambda: asyncio.run(pf.serve("k"))))
        assert isinstance(got, Served), got
        assert got.value == ("v", "k") and got.source is Source.HIT


# ---------------------------------------------------------------------------------------
# two and three Prefetchers on one real Redis


def _store(server: RedisServer, **kw: Any) -> RedisStore:
    kw.setdefault("poll_interval", 0.05)
    return RedisStore(server.url, **kw)


class _Counter:
    def __init__(self, value: Any = "value") -> None:
        self.calls = 0
        self.value = value
        self.gate = anyio.Event()
        self.started = anyio.Event()

    async def __call__(self, key: Any) -> Any:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        return self.value


@pytest.mark.redis
async def test_redis_three_instances_serve_one_execution_ran_joined_joined_then_hits(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter([1, 2])
    served: dict[str, Any] = {}
    async with (
        Prefetcher(load, store=_store(redis_server)) as a,
        Prefetcher(load, store=_store(redis_server)) as b,
        Prefetcher(load, store=_store(redis_server)) as c,
    ):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def serve(name: str, pf: Prefetcher[Any, Any]) -> None:
                    served[name] = await pf.serve("k")

                tg.start_soon(serve, "a", a)
                await load.started.wait()
                tg.start_soon(serve, "b", b)
                tg.start_soon(serve, "c", c)
                # b and c follow a's run (each a few Redis round trips away)
                while True:
                    flights = [pf._entries.get("k") for pf in (b, c)]
                    if all(getattr(f, "remote", None) is not None for f in flights):
                        break
                    await anyio.sleep(0.01)
                load.gate.set()
            assert {n: s.source for n, s in served.items()} == {
                "a": Source.RAN,
                "b": Source.JOINED,
                "c": Source.JOINED,
            }
            assert all(s.value == [1, 2] for s in served.values())
            for pf in (a, b, c):
                assert (await pf.serve("k")).source is Source.HIT
        assert load.calls == 1
        assert a.stats().load_successes == 1 and b.stats().load_successes == 0


@pytest.mark.redis
async def test_redis_watch_in_another_instance_sees_running_then_completed(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter("v")
    seen: list[Status] = []
    async with (
        Prefetcher(load, store=_store(redis_server)) as a,
        Prefetcher(load, store=_store(redis_server)) as b,
    ):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.get, "k")
                await load.started.wait()

                first = anyio.Event()

                async def watcher() -> None:
                    async for snap in b.watch("k"):
                        seen.append(snap.status)
                        first.set()

                tg.start_soon(watcher)
                await first.wait()  # B's watch has read the run (a Redis round trip)
                load.gate.set()
    assert seen[0] is Status.RUNNING and seen[-1] is Status.COMPLETED


@pytest.mark.redis
async def test_redis_server_paused_mid_load_every_waiter_ends_and_it_recovers(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter("v")
    out: list[Any] = []
    store = RedisStore(redis_server.url + "?socket_timeout=0.5", lease=1.0, poll_interval=0.05)
    with capture_logs():
        async with Prefetcher(load, store=store) as pf:
            try:
                with anyio.fail_after(20):
                    async with anyio.create_task_group() as tg:

                        async def waiter() -> None:
                            try:
                                out.append(await pf.get("k"))
                            except BaseException as exc:
                                out.append(exc)

                        tg.start_soon(waiter)
                        await load.started.wait()
                        redis_server.pause()
                        load.gate.set()
            finally:
                redis_server.resume()
            assert len(out) == 1 and (out[0] == "v" or isinstance(out[0], StoreError)), out
            with anyio.fail_after(10):
                load.value = "again"
                assert await pf.get("k2") == "again"


@pytest.mark.redis
async def test_redis_bad_keys_are_a_type_error_naming_key_on_every_verb_leaving_no_trace(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    async with Prefetcher(_value, store=_store(redis_server)) as pf:
        for bad in (frozenset({1}), b"bytes", ("ok", ["list"])):
            for call in (
                lambda bad=bad: pf.get(bad),
                lambda bad=bad: pf.serve(bad),
                lambda bad=bad: pf.status(bad),
                lambda bad=bad: pf.wait(bad),
                lambda bad=bad: pf.cancel(bad),
                lambda bad=bad: pf.invalidate(bad),
            ):
                with pytest.raises(TypeError, match="key"):
                    await call()
            with pytest.raises(TypeError, match="key"):
                pf.prefetch(bad)
            with pytest.raises(TypeError, match="key"):
                pf.watch(bad)
        deep: Any = "x"
        for _ in range(40):
            deep = (deep,)
        with pytest.raises(TypeError, match="key"):
            pf.prefetch(deep)
        s = pf.stats()
        assert (s.total, s.misses, s.prefetches, s.hits) == (0, 0, 0, 0)
