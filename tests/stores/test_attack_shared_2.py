# mypy: disable-error-code="misc"
# (the bad-input table binds its cases with lambda default arguments, which mypy cannot type)
"""Adversarial tests of shared stores, round 2 (docs/contract.md "Shared stores", docs/stores.md).

In-memory store on asyncio and trio: calls from other threads on every verb,
bad input on every verb with a store, three instances interleaving verbs while
the server flaps, progress around failures and outages, closing an owner that
others follow, shutdown_grace, force_refresh storms.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import (
    LoadCancelled,
    Prefetcher,
    PrefetcherClosed,
    Source,
    Status,
    StoreError,
    WrongThreadError,
    current_fence,
    report_progress,
)
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore

pytestmark = pytest.mark.anyio


class Gate:
    def __init__(self, value: Any = "value") -> None:
        self.value = value
        self.calls = 0
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.fences: list[int | None] = []

    async def __call__(self, key: Hashable) -> Any:
        self.calls += 1
        self.fences.append(current_fence())
        self.started.set()
        await self.release.wait()
        return self.value

    def rearm(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()


def mem(server: MemoryServer, **kw: Any) -> MemoryStore:
    kw.setdefault("progress_interval", 0.02)
    kw.setdefault("poll_interval", 0.05)
    return MemoryStore(server, **kw)


@contextlib.asynccontextmanager
async def instances(
    make: Callable[[], Any], load: Any, n: int, **options: Any
) -> AsyncIterator[list[Prefetcher[Any, Any]]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Prefetcher(load, store=make(), name=f"i{i}", **options))
            for i in range(n)
        ]


async def until(condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def following(pf: Prefetcher[Any, Any], key: Hashable) -> bool:
    entry = pf._entries.get(key)
    return entry is not None and getattr(entry, "remote", None) is not None


async def status_is(pf: Prefetcher[Any, Any], key: Hashable, status: Status) -> bool:
    return (await pf.status(key)).status is status


async def outcome_of(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except BaseException as exc:
        return exc


async def _append(into: list[Any], call: Awaitable[Any]) -> None:
    into.append(await call)


async def _quick(key: Hashable) -> str:
    return f"v-{key}"


def _trace(pf: Prefetcher[Any, Any]) -> tuple[Any, ...]:
    s = pf.stats()
    return (s.total, s.hits, s.misses, s.prefetches, s.deduplicated, len(pf.in_flight()))


# -- calls from another thread -----------------------------------------------------------------


async def test_every_verb_from_a_thread_raises_wrong_thread_with_no_store_round_trip() -> None:
    server = MemoryServer()
    load = Gate("v")
    async with instances(lambda: mem(server), load, 2) as (a, b):
        load.release.set()
        assert await a.get("done") == "v"  # a completed entry: the hit path
        load.rearm()
        b.prefetch("k")  # B runs "k"; A follows it
        await load.started.wait()
        followers: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(followers, outcome_of(a.get("k"))))
            await until(lambda: following(a, "k"))
            before_ops = server.operations
            before = _trace(a)
            wrapped = a.wrap(_quick)

            def run(coro: Any) -> Any:
                return asyncio.run(coro)

            async def drain_watch(key: str) -> Any:
                async for snap in a.watch(key):
                    return snap
                return None

            def from_thread() -> list[tuple[str, BaseException | None]]:
                calls: list[tuple[str, Callable[[], Any]]] = [
                    ("get hit", lambda: run(a.get("done"))),
                    ("get hit+fn", lambda: run(a.get("done", _quick, timeout=1))),
                    ("serve hit", lambda: run(a.serve("done"))),
                    ("get follow", lambda: run(a.get("k"))),
                    ("serve follow", lambda: run(a.serve("k"))),
                    ("get force", lambda: run(a.get("done", force_refresh=True))),
                    ("get new", lambda: run(a.get("new", _quick))),
                    ("serve new", lambda: run(a.serve("new", _quick))),
                    ("prefetch new", lambda: a.prefetch("new", _quick)),
                    ("prefetch delay", lambda: a.prefetch("new", _quick, delay=5)),
                    ("status follow", lambda: run(a.status("k"))),
                    ("status new", lambda: run(a.status("new"))),
                    ("wait follow", lambda: run(a.wait("k", timeout=1))),
                    ("wait done", lambda: run(a.wait("done"))),
                    ("cancel follow", lambda: run(a.cancel("k"))),
                    ("invalidate follow", lambda: run(a.invalidate("k"))),
                    ("invalidate done", lambda: run(a.invalidate("done"))),
                    ("watch", lambda: a.watch("k")),
                    ("watch drain", lambda: run(drain_watch("done"))),
                    ("in_flight", lambda: a.in_flight()),
                    ("sweep", lambda: a.sweep()),
                    ("wrapped", lambda: run(wrapped("new"))),
                ]
                out: list[tuple[str, BaseException | None]] = []
                for name, call in calls:
                    try:
                        call()
                    except BaseException as exc:
                        out.append((name, exc))
                    else:
                        out.append((name, None))
                return out

            results = await anyio.to_thread.run_sync(from_thread)
            wrong = [(n, e) for n, e in results if not isinstance(e, WrongThreadError)]
            assert wrong == [], wrong
            assert server.operations == before_ops  # no store round trip for a refused call
            assert _trace(a) == before
            assert await following(a, "k")  # the follow goes on untouched
            assert (await b.status("k")).status is Status.RUNNING
            load.release.set()
        assert followers == ["v"]
        assert (await a.status("done")).status is Status.COMPLETED
        assert (await a.status("new")).status is Status.NOT_STARTED
        assert load.calls == 2


# -- bad input on every verb with a store --------------------------------------------------------


async def test_bad_input_on_every_verb_is_refused_before_any_store_round_trip() -> None:
    server = MemoryServer()
    async with instances(lambda: mem(server), _quick, 1) as (a,):
        assert await a.get("done") == "v-done"
        before_ops = server.operations
        before = _trace(a)

        async def coro_fn(key: Hashable) -> str:
            return "x"

        coro = coro_fn("k")
        bad_timeouts: list[Any] = ["1", -1, float("nan"), float("inf"), b"1", [1], True]
        bad_delays: list[Any] = ["1", -1, float("nan"), float("inf"), None, [0]]
        cases: list[tuple[str, Callable[[], Any], type[BaseException]]] = []
        for t in bad_timeouts:
            for key in ("done", "cold"):
                cases.append(
                    (f"get {key} t={t!r}", lambda k=key, t=t: a.get(k, timeout=t), Exception)
                )
                cases.append(
                    (f"serve {key} t={t!r}", lambda k=key, t=t: a.serve(k, timeout=t), Exception)
                )
                cases.append(
                    (f"wait {key} t={t!r}", lambda k=key, t=t: a.wait(k, timeout=t), Exception)
                )
        for d in bad_delays:
            cases.append((f"prefetch d={d!r}", lambda d=d: a.prefetch("cold", delay=d), Exception))
        unhashable: list[Any] = [[1], {"a": 1}, {1}, bytearray(b"x")]
        for bad in unhashable:
            for verb in ("get", "serve", "status", "wait", "cancel", "invalidate"):
                cases.append((f"{verb} {bad!r}", lambda v=verb, k=bad: getattr(a, v)(k), TypeError))
            cases.append((f"prefetch {bad!r}", lambda k=bad: a.prefetch(k), TypeError))
            cases.append((f"watch {bad!r}", lambda k=bad: a.watch(k), TypeError))
        for fn in (42, "fn", coro, None.__class__):
            for key in ("done", "cold"):
                cases.append((f"get {key} fn={fn!r}", lambda k=key, f=fn: a.get(k, f), TypeError))
                cases.append(
                    (f"serve {key} fn={fn!r}", lambda k=key, f=fn: a.serve(k, f), TypeError)
                )
                cases.append(
                    (
                        f"force {key} fn={fn!r}",
                        lambda k=key, f=fn: a.get(k, f, force_refresh=True),
                        TypeError,
                    )
                )
            cases.append((f"prefetch fn={fn!r}", lambda f=fn: a.prefetch("cold", f), TypeError))
        cases.append(("args without fn", lambda: a.get("cold", None, 1), TypeError))
        cases.append(("prefetch args without fn", lambda: a.prefetch("cold", None, 1), TypeError))
        wrong: list[Any] = []
        for name, call, kind in cases:
            try:
                r = call()
                if asyncio.iscoroutine(r) or hasattr(r, "__await__"):
                    await r
            except (TypeError, ValueError) as exc:
                if not isinstance(exc, kind):
                    wrong.append((name, exc))
            except BaseException as exc:
                wrong.append((name, exc))
            else:
                wrong.append((name, "no error"))
        coro.close()
        assert wrong == [], wrong
        assert server.operations == before_ops
        assert _trace(a) == before
        assert (await a.status("cold")).status is Status.NOT_STARTED


async def test_bad_input_is_refused_while_the_store_is_down_as_bad_input() -> None:
    server = MemoryServer()
    async with instances(lambda: mem(server), _quick, 1) as (a,):
        server.down = True
        try:
            with pytest.raises(ValueError, match="timeout"):
                await a.get("cold", timeout=-1)
            with pytest.raises(ValueError, match="delay"):
                a.prefetch("cold", delay=-1)
            with pytest.raises(TypeError, match="key"):
                await a.get(["x"])
            with pytest.raises(TypeError, match="fn"):
                await a.get("cold", 42)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="timeout"):
                await a.wait("cold", timeout=float("nan"))
            assert a.stats().total == 0 and a.in_flight() == []
        finally:
            server.down = False
        assert await a.get("cold") == "v-cold"


# -- three instances, interleaved verbs, a flapping server -------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_three_instances_interleaved_verbs_with_a_flapping_server_settle(seed: int) -> None:
    rng = random.Random(seed)
    server = MemoryServer()
    runs: dict[str, int] = {}

    async def load(key: Hashable) -> str:
        runs[str(key)] = runs.get(str(key), 0) + 1
        await anyio.sleep(rng.choice([0, 0.005, 0.02]))
        report_progress(1, 2)
        await anyio.sleep(rng.choice([0, 0.01]))
        return f"v-{key}"

    keys = ["a", "b", "c"]
    outcomes: list[Any] = []
    with capture_logs(), anyio.fail_after(30):
        async with instances(lambda: mem(server, lease=0.5), load, 3) as pfs:

            async def watch_one(pf: Prefetcher[Any, Any], key: str) -> None:
                with anyio.move_on_after(0.3):
                    try:
                        async for _ in pf.watch(key):
                            pass
                    except StoreError as exc:  # the store is down: a watch may say so
                        outcomes.append(exc)

            async with anyio.create_task_group() as tg:
                for _step in range(120):
                    pf = rng.choice(pfs)
                    key = rng.choice(keys)
                    op = rng.choice(
                        [
                            "get",
                            "serve",
                            "force",
                            "prefetch",
                            "delay",
                            "cancel",
                            "invalidate",
                            "watch",
                            "wait",
                            "status",
                            "flap",
                        ]
                    )
                    if op == "get":
                        tg.start_soon(_append, outcomes, outcome_of(pf.get(key, timeout=5)))
                    elif op == "serve":
                        tg.start_soon(_append, outcomes, outcome_of(pf.serve(key, timeout=5)))
                    elif op == "force":
                        tg.start_soon(
                            _append,
                            outcomes,
                            outcome_of(pf.get(key, force_refresh=True, timeout=5)),
                        )
                    elif op == "prefetch":
                        pf.prefetch(key)
                    elif op == "delay":
                        pf.prefetch(key, delay=rng.choice([0.01, 0.05]))
                    elif op == "cancel":
                        tg.start_soon(_append, outcomes, outcome_of(pf.cancel(key)))
                    elif op == "invalidate":
                        tg.start_soon(_append, outcomes, outcome_of(pf.invalidate(key)))
                    elif op == "watch":
                        tg.start_soon(watch_one, pf, key)
                    elif op == "wait":
                        tg.start_soon(_append, outcomes, outcome_of(pf.wait(key, timeout=5)))
                    elif op == "status":
                        tg.start_soon(_append, outcomes, outcome_of(pf.status(key)))
                    else:
                        server.down = not server.down
                    await anyio.sleep(rng.choice([0, 0, 0.005, 0.01]))
                server.down = False
            allowed = (str, bool, LoadCancelled, StoreError, TimeoutError)
            odd = [
                o
                for o in outcomes
                if not isinstance(o, allowed) and type(o).__name__ not in ("Served", "Snapshot")
            ]
            assert odd == [], odd
            for o in outcomes:
                if isinstance(o, str):
                    assert o.startswith("v-")
            # settled: every instance agrees on each key's value once it is fetched
            for key in keys:
                vals = [await pf.get(key, timeout=10) for pf in pfs]
                assert vals == [f"v-{key}"] * 3
                for pf in pfs:
                    # a completion written during an outage is retried with back-off: the
                    # store's lease of that run may show it RUNNING a little longer
                    await until(lambda pf=pf, key=key: status_is(pf, key, Status.COMPLETED))
            for pf in pfs:
                with anyio.fail_after(10):
                    for key in keys:
                        assert (await pf.wait(key)).status is Status.COMPLETED


# -- progress around failures and outages --------------------------------------------------------


async def test_a_load_that_fails_right_after_reporting_progress_is_failed_everywhere() -> None:
    server = MemoryServer()

    async def load(key: Hashable) -> str:
        for i in range(5):
            report_progress(i, 5, f"step {i}")
            await anyio.lowlevel.checkpoint()
        report_progress(5, 5)
        raise RuntimeError("boom after progress")

    with capture_logs():
        async with instances(lambda: mem(server), load, 3) as (a, b, c):
            with pytest.raises(RuntimeError, match="boom"):
                await a.get("k")
            await anyio.sleep(0.1)  # any progress writer in flight has its chance to run
            for pf in (a, b, c):
                snap = await pf.status("k")
                assert snap.status is Status.FAILED, (pf.name, snap)
                assert snap.error is not None and "boom after progress" in snap.error
            assert a.in_flight() == []


async def test_progress_while_the_store_is_down_never_breaks_the_load() -> None:
    server = MemoryServer()
    step = anyio.Event()
    go_on = anyio.Event()

    async def load(key: Hashable) -> str:
        report_progress(1, 3)
        step.set()
        await go_on.wait()
        report_progress(2, 3, "during the outage")
        await anyio.sleep(0.1)
        report_progress(3, 3)
        return "ok"

    with capture_logs():
        async with instances(lambda: mem(server, lease=5), load, 2) as (a, b):
            out: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_append, out, outcome_of(a.get("k")))
                await step.wait()
                server.down = True
                go_on.set()
                await anyio.sleep(0.05)
                server.down = False
            assert out == ["ok"]
            assert await b.get("k") == "ok"
            snap = await b.status("k")
            assert snap.status is Status.COMPLETED


async def test_a_watcher_on_a_bystander_sees_a_failure_after_progress() -> None:
    server = MemoryServer()
    release = anyio.Event()

    async def load(key: Hashable) -> str:
        report_progress(1, 2, "half")
        await release.wait()
        raise ValueError("late failure")

    async with instances(lambda: mem(server), load, 2) as (a, b):
        a.prefetch("k")
        seen: list[Any] = []

        async def watch() -> None:
            async for snap in b.watch("k"):
                seen.append(snap)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await until(lambda: _has_progress(seen))
                release.set()
        assert seen[-1].status is Status.FAILED
        assert "late failure" in (seen[-1].error or "")


async def _has_progress(seen: list[Any]) -> bool:
    return any(s.progress is not None for s in seen)


# -- closing an owner that others follow ---------------------------------------------------------


async def test_closing_the_owner_with_followers_on_two_instances_is_one_takeover() -> None:
    server = MemoryServer()
    first = Gate("first")
    second = Gate("second")
    out: list[Any] = []
    with capture_logs(), anyio.fail_after(15):
        async with (
            Prefetcher(second, store=mem(server), name="b") as b,
            Prefetcher(second, store=mem(server), name="c") as c,
        ):
            async with anyio.create_task_group() as tg:
                async with Prefetcher(first, store=mem(server), name="a") as a:
                    a.prefetch("k")
                    await first.started.wait()
                    for pf in (b, c):
                        for _ in range(2):
                            tg.start_soon(_append, out, outcome_of(pf.get("k")))
                    await until(lambda: following(b, "k"))
                    await until(lambda: following(c, "k"))
                await second.started.wait()
                second.release.set()
            assert out == ["second"] * 4, out
            assert (first.calls, second.calls) == (1, 1)
            for pf in (b, c):
                assert (await pf.serve("k")).source is Source.HIT
            assert second.fences[0] is not None and first.fences[0] is not None
            assert second.fences[0] > first.fences[0]


async def test_closing_the_owner_while_the_store_is_down_lets_followers_take_over_later() -> None:
    server = MemoryServer()
    first = Gate("first")
    second = Gate("second")
    second.release.set()
    out: list[Any] = []
    with capture_logs(), anyio.fail_after(15):
        async with (
            Prefetcher(second, store=mem(server, lease=0.5), name="b") as b,
            anyio.create_task_group() as tg,
        ):
            if True:  # (the owner's block ends first, inside the task group)
                async with Prefetcher(first, store=mem(server, lease=0.5), name="a") as a:
                    a.prefetch("k")
                    await first.started.wait()
                    tg.start_soon(_append, out, outcome_of(b.get("k")))
                    await until(lambda: following(b, "k"))
                    server.down = True  # A cannot release its lease on the way out
                await anyio.sleep(0.1)
                server.down = False
        assert out == ["second"], out
        assert second.calls == 1


async def test_shutdown_grace_with_a_store_bounds_close_and_nothing_is_stored() -> None:
    server = MemoryServer()
    load = Gate("never")
    with capture_logs() as logs:
        async with Prefetcher(_quick, store=mem(server), name="b") as b:
            began = anyio.current_time()
            async with Prefetcher(load, store=mem(server), name="a", shutdown_grace=0.2) as a:
                a.prefetch("k")
                await load.started.wait()
            took = anyio.current_time() - began
            assert 0.15 <= took < 3, took
            assert any(e["event"] == "prefetch.cancelled" for e in logs)
            # the cancelled owner stored nothing; its lease is gone: B runs at once
            with anyio.fail_after(2):
                served = await b.serve("k")
                assert (served.value, served.source) == ("v-k", Source.RAN)
    with pytest.raises(PrefetcherClosed):
        await a.get("k")


async def test_shutdown_grace_with_a_store_lets_a_finishing_load_store_its_value() -> None:
    server = MemoryServer()

    async def slowish(key: Hashable) -> str:
        await anyio.sleep(0.1)
        return "graced"

    with anyio.fail_after(10):
        async with Prefetcher(slowish, store=mem(server), name="a", shutdown_grace=5) as a:
            a.prefetch("k")
            a.prefetch("j", delay=60)  # a delayed one never starts
        async with Prefetcher(_quick, store=mem(server), name="b") as b:
            assert (await b.serve("k")).source is Source.HIT
            assert (await b.get("k")) == "graced"
            assert (await b.status("j")).status is Status.NOT_STARTED
            assert await b.get("j") == "v-j"


# -- force_refresh storms ------------------------------------------------------------------------


async def test_force_refresh_storms_on_three_instances_are_one_run_per_storm() -> None:
    server = MemoryServer()
    n = 0
    fences: list[int | None] = []
    started = 0

    async def load(key: Hashable) -> str:
        nonlocal n, started
        started += 1
        fences.append(current_fence())
        await anyio.sleep(0.05)
        n += 1
        return f"v{n}"

    with anyio.fail_after(30):
        async with instances(lambda: mem(server), load, 3) as pfs:
            assert await pfs[0].get("k") == "v1"
            for storm in range(2, 6):
                out: list[Any] = []
                async with anyio.create_task_group() as tg:
                    for i in range(30):
                        tg.start_soon(
                            _append, out, outcome_of(pfs[i % 3].get("k", force_refresh=True))
                        )
                assert started == storm, (storm, started, out)
                assert out == [f"v{storm}"] * 30, out
                vals = [await pf.get("k") for pf in pfs]
                assert vals == [f"v{storm}"] * 3
    assert all(f is not None for f in fences)
    known = [f for f in fences if f is not None]
    assert known == sorted(set(known))  # strictly growing


async def test_force_refresh_storm_with_the_store_flapping_ends_every_caller() -> None:
    server = MemoryServer()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.02)
        return "v"

    with capture_logs(), anyio.fail_after(30):
        async with instances(lambda: mem(server, lease=0.5), load, 3) as pfs:
            assert await pfs[0].get("k") == "v"
            out: list[Any] = []
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(
                        _append,
                        out,
                        outcome_of(pfs[i % 3].get("k", force_refresh=True, timeout=10)),
                    )
                    if i % 7 == 0:
                        server.down = not server.down
                    await anyio.sleep(0.003)
                server.down = False
            assert len(out) == 60
            assert all(o == "v" or isinstance(o, StoreError) for o in out), out
            for pf in pfs:
                assert await pf.get("k") == "v"
                assert pf.in_flight() == []


# -- cancel / invalidate while the store is down ----------------------------------------------


async def _run_owner_with_follower_then(
    verb: str,
) -> tuple[Any, list[Any], list[Any], Any, int]:
    server = MemoryServer()
    load = Gate("v")
    out: list[Any] = []
    with capture_logs():
        async with instances(lambda: mem(server, lease=2), load, 2) as (a, b):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_append, out, outcome_of(a.get("k")))
                await load.started.wait()
                tg.start_soon(_append, out, outcome_of(b.get("k")))
                await until(lambda: following(b, "k"))
                server.down = True
                result = await outcome_of(getattr(a, verb)("k"))
                flights = [s.status for s in a.in_flight()]
                server.down = False
                load.release.set()
            stored = await outcome_of(b.serve("k"))
    return result, flights, out, stored, load.calls


async def test_a_cancel_that_fails_with_store_error_leaves_the_run_alone() -> None:
    result, flights, out, _stored, calls = await _run_owner_with_follower_then("cancel")
    assert isinstance(result, StoreError)
    assert flights == [Status.RUNNING]  # nothing happened: the run goes on
    assert out == ["v", "v"]
    assert calls == 1


async def test_an_invalidate_that_fails_with_store_error_has_no_half_effect() -> None:
    result, flights, _out, stored, _calls = await _run_owner_with_follower_then("invalidate")
    assert isinstance(result, StoreError)
    detached = flights == []
    stored_value = getattr(stored, "source", None) is Source.HIT
    # either it did nothing (the run stays attached and is stored), or it detached the
    # run and then the run is never stored (docs/contract.md: a detached run is never stored)
    assert not (detached and stored_value), (flights, stored)
    assert flights == [Status.RUNNING]


async def test_closing_a_watch_from_a_thread_raises_wrong_thread_and_leaves_it_watching() -> None:
    server = MemoryServer()
    seen: list[Any] = []
    async with instances(lambda: mem(server), _quick, 2) as (a, b):
        w = a.watch("k")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    async for snap in w:
                        seen.append(snap.status)

                tg.start_soon(consume)
                await until(lambda: _has(seen, Status.NOT_STARTED))
                watchers = a.stats().watchers

                def from_thread() -> BaseException | None:
                    try:
                        asyncio.run(w.aclose())
                    except BaseException as exc:
                        return exc
                    return None

                error = await anyio.to_thread.run_sync(from_thread)
                refused = isinstance(error, WrongThreadError)
                still = a.stats().watchers == watchers
                await b.get("k")  # ends the watch on the loop's thread either way
                await anyio.sleep(0.2)
                await w.aclose()
        assert refused, error
        assert still


async def _has(seen: list[Any], item: Any) -> bool:
    return item in seen


class EvilStr(str):
    """A progress message whose comparisons and texts raise (inside report_progress's fan-out)."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("evil eq")

    def __ne__(self, other: object) -> bool:
        raise RuntimeError("evil ne")

    __hash__ = str.__hash__

    def __str__(self) -> str:
        raise RuntimeError("evil str")

    def __repr__(self) -> str:
        raise RuntimeError("evil repr")


async def test_a_hostile_progress_message_breaks_no_watcher_on_any_instance() -> None:
    server = MemoryServer()

    async def load(key: Hashable) -> str:
        report_progress(1, 3, EvilStr("m1"))
        await anyio.sleep(0.05)
        report_progress(2, 3, EvilStr("m2"))
        await anyio.sleep(0.05)
        return "v"

    with capture_logs():
        async with instances(lambda: mem(server), load, 2) as (a, b):
            seen: dict[str, list[Any]] = {"i0": [], "i1": []}

            async def watch(pf: Prefetcher[Any, Any]) -> None:
                async for snap in pf.watch("k"):
                    seen[pf.name].append(snap.status)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch, a)
                    tg.start_soon(watch, b)
                    await until(lambda: _has(seen["i1"], Status.NOT_STARTED))
                    await until(lambda: _has(seen["i0"], Status.NOT_STARTED))
                    assert await a.get("k") == "v"
            for name in ("i0", "i1"):
                assert seen[name][0] is Status.NOT_STARTED and seen[name][-1] is Status.COMPLETED
                assert Status.RUNNING in seen[name]
            assert await b.get("other") == "v"
