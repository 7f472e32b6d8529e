"""Adversarial tests of shared stores v2 (docs/contract.md, "Shared stores").

Several Prefetcher instances in one event loop share runs through one store:
the in-memory backend (asyncio and trio; faults by ``server.down`` and
``server.lose_everything()``) and, where a real server matters (killed,
paused, restarted, corrupt bytes), a private redis-server (asyncio only).
Each test is named after the contract behaviour it asserts. The 15 library bugs this
file found were first strict xfails with their diagnosis, and are fixed (git log).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import (
    CodecError,
    LoadCancelled,
    Prefetcher,
    PrefetcherClosed,
    ReentrantLoadError,
    RemoteLoadError,
    Source,
    Status,
    StoreError,
    WrongThreadError,
    current_fence,
    report_progress,
)
from prefetch_ingest.redis import RedisStore
from prefetch_ingest.stores.interface import Outcome
from prefetch_ingest.stores.keys import digest_of
from prefetch_ingest.stores.lease import new_token
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore, _Entry, _Slot
from tests.redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.anyio

redis_server = redis_server_fixture()
durable_redis = redis_server_fixture(persistent=True, name="durable_redis")


# -- helpers -----------------------------------------------------------------------------------


class Gate:
    """A load that counts its runs, records its fence, and ends when told."""

    def __init__(self, value: Any = "value") -> None:
        self.value = value
        self.calls = 0
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.error: BaseException | None = None
        self.fences: list[int | None] = []

    async def __call__(self, key: Hashable) -> Any:
        self.calls += 1
        self.fences.append(current_fence())
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value

    def rearm(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()


def mem(server: MemoryServer, **kw: Any) -> MemoryStore:
    kw.setdefault("progress_interval", 0.02)
    kw.setdefault("poll_interval", 0.05)
    return MemoryStore(server, **kw)


def rstore(server: RedisServer, **kw: Any) -> RedisStore:
    kw.setdefault("poll_interval", 0.05)
    return RedisStore(server.url, **kw)


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
    """Re-check a store condition (another instance's state: no local event) until it holds."""
    with anyio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110 - a store condition: no local event
            await anyio.sleep(0.01)


async def following(pf: Prefetcher[Any, Any], key: Hashable) -> bool:
    entry = pf._entries.get(key)
    return entry is not None and getattr(entry, "remote", None) is not None


async def _followers(n: int, *pfs: Prefetcher[Any, Any]) -> bool:
    """Exactly ``n`` of ``pfs`` follow another instance's run of ``"k"``."""
    return sum([await following(pf, "k") for pf in pfs]) == n


async def status_is(pf: Prefetcher[Any, Any], key: Hashable, status: Status) -> bool:
    return (await pf.status(key)).status is status


async def _no_flight(pf: Prefetcher[Any, Any], key: Hashable) -> bool:
    return pf._entries.get(key).__class__.__name__ != "Flight"


async def outcome_of(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except BaseException as exc:  # the outcome is what is under test
        return exc


class Outcomes(list[Any]):
    """Results of calls, collected as they end; ``reach(n)`` waits for the n-th (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._waits: list[tuple[int, anyio.Event]] = []

    def append(self, item: Any) -> None:
        super().append(item)
        for n, event in self._waits:
            if len(self) >= n:
                event.set()

    async def reach(self, n: int) -> None:
        if len(self) < n:
            event = anyio.Event()
            self._waits.append((n, event))
            await event.wait()


async def _append(into: list[Any], call: Awaitable[Any]) -> None:
    into.append(await call)


class Odd(BaseException):
    pass


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


# -- one execution per key ---------------------------------------------------------------------


async def test_one_execution_across_three_instances_with_get_serve_prefetch_and_force() -> None:
    server = MemoryServer()
    load = Gate({"n": 1})
    results: list[Any] = []
    async with instances(lambda: mem(server), load, 3) as (a, b, c):
        async with anyio.create_task_group() as tg:
            assert a.prefetch("k")
            assert b.prefetch("k")

            async def call(coro: Awaitable[Any]) -> None:
                results.append(await coro)

            for pf in (a, b, c):
                tg.start_soon(call, pf.get("k"))
                tg.start_soon(call, pf.serve("k"))
                tg.start_soon(call, pf.get("k", force_refresh=True))
            await load.started.wait()
            await until(lambda: _followers(2, a, b, c))  # whichever owns, the others follow
            load.release.set()
        assert load.calls == 1
        values = [r.value if hasattr(r, "source") else r for r in results]
        assert values == [{"n": 1}] * 9
        sources = [r.source for r in results if hasattr(r, "source")]
        assert all(s in (Source.RAN, Source.JOINED) for s in sources)
        assert sources.count(Source.RAN) <= 1
        # every instance now serves the one stored value without running
        for pf in (a, b, c):
            assert await pf.serve("k") == (await pf.serve("k"))
            assert (await pf.serve("k")).source is Source.HIT
        assert load.calls == 1


async def test_force_refresh_on_two_instances_is_one_refresh_run_with_a_greater_fence() -> None:
    server = MemoryServer()
    load = Gate("v1")
    load.release.set()
    async with instances(lambda: mem(server), load, 2) as (a, b):
        assert await a.get("k") == "v1"
        load.rearm()
        load.value = "v2"
        got: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(got, a.get("k", force_refresh=True)))
            await load.started.wait()
            tg.start_soon(lambda: _append(got, b.get("k", force_refresh=True)))
            await until(lambda: following(b, "k"))
            load.release.set()
        assert got == ["v2", "v2"]
        assert load.calls == 2
        f1, f2 = load.fences
        assert f1 is not None and f2 is not None and f2 > f1
        assert await b.get("k") == "v2" and await a.get("k") == "v2"


async def test_refresh_after_on_three_instances_is_one_background_reload_and_stale_hits() -> None:
    server = MemoryServer()
    load = Gate("old")
    load.release.set()
    async with instances(lambda: mem(server), load, 3, refresh_after=0.05) as pfs:
        a = pfs[0]
        assert await a.get("k") == "old"
        await anyio.sleep(0.1)  # the stored value ages past refresh_after (wall clock)
        load.rearm()
        load.value = "new"
        served = [await pf.serve("k") for pf in pfs]
        assert [(s.value, s.source) for s in served] == [("old", Source.HIT)] * 3
        await load.started.wait()
        for pf in pfs:
            assert await pf.get("k") == "old"  # still served at once while one reload runs
        load.release.set()

        async def all_new() -> bool:
            return all([(await pf.status("k")).result == "new" for pf in pfs])

        await until(all_new)
        assert load.calls == 2  # the first run and exactly one reload across three instances


async def test_one_store_object_cannot_serve_two_prefetchers_at_once() -> None:
    server = MemoryServer()
    store = mem(server)
    load = Gate("v")
    load.release.set()
    async with Prefetcher(load, store=store) as a:
        with pytest.raises(RuntimeError, match="already open"):
            async with Prefetcher(load, store=store):
                pass
        assert await a.get("k") == "v"
        assert (await a.status("k")).status is Status.COMPLETED


# -- freshness ---------------------------------------------------------------------------------


async def test_ttl_zero_a_completed_run_is_not_served_to_a_later_get_on_another_instance() -> None:
    server = MemoryServer()
    load = Gate()
    load.release.set()
    async with instances(lambda: mem(server), load, 2, ttl=0) as (a, b):
        assert await a.get("k") == "value"
        assert await b.get("k") == "value"
        assert load.calls == 2  # ttl=0: a value is never served after its completion


async def test_a_failed_refresh_keeps_the_old_value_on_every_instance() -> None:
    server = MemoryServer()
    load = Gate("v1")
    load.release.set()
    async with instances(lambda: mem(server), load, 2, failure_ttl=60) as (a, b):
        assert await a.get("k") == "v1"
        load.error = ValueError("refresh failed")
        with pytest.raises(ValueError, match="refresh failed"):
            await a.get("k", force_refresh=True)
        for pf in (a, b):
            snap = await pf.status("k")
            assert snap.status is Status.COMPLETED and snap.result == "v1"
            assert await pf.get("k") == "v1"
        assert load.calls == 2


async def test_a_failed_background_refresh_does_not_pin_a_value_invalidated_elsewhere() -> None:
    server = MemoryServer()
    load = Gate("v1")
    load.release.set()
    async with instances(lambda: mem(server), load, 3, refresh_after=0.05) as (a, b, c):
        assert await a.get("k") == "v1"
        await anyio.sleep(0.1)  # the stored value's age (wall clock) passes refresh_after
        load.error = ValueError("refresh failed")
        load.rearm()
        assert await b.get("k") == "v1"  # stale, served at once; a refresh starts on B
        await load.started.wait()
        load.release.set()
        await until(lambda: _no_flight(b, "k"))
        assert await c.invalidate("k")
        load.error = None
        load.value = "v2"
        assert await b.get("k") == "v2"


async def test_a_cancelled_background_refresh_does_not_pin_a_value_invalidated_elsewhere() -> None:
    server = MemoryServer()
    load = Gate("v1")
    load.release.set()
    async with instances(lambda: mem(server), load, 3, refresh_after=0.05) as (a, b, c):
        assert await a.get("k") == "v1"
        await anyio.sleep(0.1)  # the stored value's age (wall clock) passes refresh_after
        load.rearm()
        assert await b.get("k") == "v1"  # stale, served at once; B's refresh runs
        await load.started.wait()
        assert await c.cancel("k")  # that refresh is cancelled from another instance
        await until(lambda: _no_flight(b, "k"))
        assert await c.invalidate("k")
        load.release.set()
        load.value = "v2"
        assert await b.get("k") == "v2"


# -- followers describe the run itself ---------------------------------------------------------


async def test_status_of_a_run_is_identical_on_the_owner_a_follower_and_a_bystander() -> None:
    server = MemoryServer()
    load = Gate()

    async def reporting(key: Hashable) -> Any:
        report_progress(4, 8, "half")
        return await load(key)

    async with instances(lambda: mem(server), reporting, 3) as (a, b, c):
        async with anyio.create_task_group() as tg:
            assert a.prefetch("k")
            await load.started.wait()
            tg.start_soon(b.get, "k")
            await until(lambda: following(b, "k"))

            async def everywhere_half() -> bool:
                snaps = [await pf.status("k") for pf in (a, b, c)]
                return all(s.progress is not None and s.progress.done == 4 for s in snaps)

            await until(everywhere_half)
            snaps = [await pf.status("k") for pf in (a, b, c)]
            for s in snaps:
                assert s.status is Status.RUNNING
                assert s.background is True
                assert s.started_at == snaps[0].started_at
                assert s.progress is not None
                assert (s.progress.done, s.progress.total, s.progress.message) == (4, 8, "half")
            assert c.in_flight() == []  # the bystander runs nothing itself
            load.release.set()
        snaps = [await pf.status("k") for pf in (a, b, c)]
        assert all(s == snaps[0] for s in snaps), snaps
        assert snaps[0].status is Status.COMPLETED and snaps[0].background is True


async def test_a_watch_on_a_bystander_sees_the_remote_progress_and_the_end() -> None:
    server = MemoryServer()
    load = Gate("done")
    step = anyio.Event()

    async def stepping(key: Hashable) -> Any:
        report_progress(1, 3)
        await step.wait()
        report_progress(2, 3)
        report_progress(3, 3, "last")
        return await load(key)

    seen: list[tuple[Status, Any]] = []
    async with instances(lambda: mem(server), stepping, 2) as (a, c):
        a.prefetch("k")
        with anyio.fail_after(10):
            async with c.watch("k") as updates:
                async for snap in updates:
                    p = snap.progress
                    seen.append((snap.status, None if p is None else (p.done, p.message)))
                    if p is not None and p.done == 1:
                        step.set()
                    if p is not None and p.done == 3:
                        load.release.set()
    assert (Status.RUNNING, (1.0, None)) in seen
    assert (Status.RUNNING, (3.0, "last")) in seen  # the trailing edge of a burst arrives
    assert seen[-1] == (Status.COMPLETED, None)


async def test_the_last_progress_of_a_burst_reaches_a_bystander_during_a_long_await() -> None:
    server = MemoryServer()
    load = Gate()

    async def bursting(key: Hashable) -> Any:
        for i in range(1, 101):
            report_progress(i, 100, f"step {i}")
            if i % 10 == 0:
                await anyio.lowlevel.checkpoint()
        return await load(key)

    async with instances(lambda: mem(server, progress_interval=0.1), bursting, 2) as (a, c):
        a.prefetch("k")
        await load.started.wait()

        async def at_hundred() -> bool:
            p = (await c.status("k")).progress
            return p is not None and p.done == 100 and p.message == "step 100"

        await until(at_hundred)
        load.release.set()
        assert (await c.wait("k", timeout=10)).result == "value"


# -- failures ----------------------------------------------------------------------------------


async def test_a_failure_is_failed_on_three_instances_and_any_next_get_reruns() -> None:
    server = MemoryServer()
    load = Gate()
    load.error = KeyError("gone")
    async with instances(lambda: mem(server), load, 3) as (a, b, c):
        async with anyio.create_task_group() as tg:
            out: list[Any] = []
            assert a.prefetch("k")
            await load.started.wait()
            tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
            await until(lambda: following(b, "k"))
            load.release.set()
        (err,) = out
        assert isinstance(err, RemoteLoadError) and err.error_type == "KeyError"
        assert err.message == "'gone'"
        for pf in (a, b, c):
            snap = await pf.status("k")
            assert snap.status is Status.FAILED
            assert snap.error == "KeyError: 'gone'"
            assert snap.background is True
        load.error = None
        assert await c.get("k") == "value"  # failure_ttl=0: the next get runs again
        assert load.calls == 2
        for pf in (a, b, c):
            assert (await pf.status("k")).status is Status.COMPLETED


async def test_within_failure_ttl_no_instance_runs_again_even_for_a_hostile_exception() -> None:
    server = MemoryServer()
    load = Gate()
    load.error = BadStr()
    load.release.set()
    async with instances(lambda: mem(server), load, 3, failure_ttl=60) as (a, b, c):
        with pytest.raises(BadStr) as first:
            await a.get("k")
        for _ in range(3):
            with pytest.raises(BadStr) as again:
                await a.get("k")
            assert again.value is first.value
        for pf in (b, c):
            with pytest.raises(RemoteLoadError) as remote:
                await pf.get("k")
            assert remote.value.error_type == "BadStr"
            assert remote.value.message is not None
            with pytest.raises(RemoteLoadError):
                await pf.get("k", force_refresh=False)
        assert load.calls == 1
        assert all([(await pf.status("k")).status is Status.FAILED for pf in (a, b, c)])


async def test_a_failure_invalidated_on_another_instance_is_no_longer_reported_here() -> None:
    server = MemoryServer()
    load = Gate()
    load.error = ValueError("bad")
    load.release.set()
    async with instances(lambda: mem(server), load, 2) as (a, b):
        with pytest.raises(ValueError, match="bad"):
            await a.get("k")
        assert (await a.status("k")).status is Status.FAILED
        assert await b.invalidate("k")
        assert (await b.status("k")).status is Status.NOT_STARTED
        assert (await a.status("k")).status is Status.NOT_STARTED


async def test_the_owners_snapshot_of_its_failure_carries_the_exception_within_failure_ttl() -> (
    None
):
    server = MemoryServer()
    load = Gate()
    load.error = ValueError("bad")
    load.release.set()
    async with instances(lambda: mem(server), load, 2, failure_ttl=60) as (a, b):
        with pytest.raises(ValueError) as caught:
            await a.get("k")
        snap = await a.status("k")
        assert snap.status is Status.FAILED
        assert snap.exception is caught.value
        other = await b.status("k")
        assert other.status is Status.FAILED and other.exception is None


# -- cancel and invalidate from any instance ---------------------------------------------------


async def test_cancel_from_the_owner_gives_every_waiter_everywhere_load_cancelled() -> None:
    server = MemoryServer()
    load = Gate("never")
    async with instances(lambda: mem(server), load, 3) as (a, b, c):
        out: dict[str, list[Any]] = {"a": [], "b": [], "c": [], "wait": []}
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: _append(out["a"], outcome_of(a.get("k"))))
            await load.started.wait()
            for _ in range(3):
                tg.start_soon(lambda: _append(out["b"], outcome_of(b.get("k"))))
                tg.start_soon(lambda: _append(out["c"], outcome_of(c.serve("k"))))
            tg.start_soon(lambda: _append(out["wait"], c.wait("k", timeout=10)))
            await until(lambda: following(b, "k"))
            await until(lambda: following(c, "k"))
            assert await a.cancel("k") is True
        for name in ("a", "b", "c"):
            assert len(out[name]) == 3
            assert all(isinstance(v, LoadCancelled) for v in out[name]), out
        (snap,) = out["wait"]
        assert snap.status is not Status.RUNNING  # wait() returned, and did not raise
        assert (await a.status("k")).status is Status.NOT_STARTED
        async with instances(lambda: mem(server), load, 1) as (d,):
            assert (await d.status("k")).status is Status.NOT_STARTED  # nothing stored
        assert load.calls == 1


async def test_after_a_cancel_elsewhere_followers_report_the_key_as_before() -> None:
    server = MemoryServer()
    load = Gate("never")
    async with instances(lambda: mem(server), load, 3) as (a, b, c):
        out: list[Any] = []
        waited: list[Any] = []
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                await load.started.wait()
                tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                tg.start_soon(lambda: _append(waited, b.wait("k", timeout=10)))
                await until(lambda: following(b, "k"))
                assert await c.cancel("k") is True
        assert len(out) == 2 and all(isinstance(v, LoadCancelled) for v in out), out
        (snap,) = waited
        assert snap.status is Status.NOT_STARTED  # the key as before that load
        for pf in (a, b, c):
            assert (await pf.status("k")).status is Status.NOT_STARTED
        assert not [e for e in logs if e["event"] == "prefetch.failed"]


async def test_cancel_from_a_follower_ends_the_run_and_keeps_the_prior_value_everywhere() -> None:
    server = MemoryServer()
    load = Gate("v1")
    load.release.set()
    async with instances(lambda: mem(server), load, 2) as (a, b):
        assert await a.get("k") == "v1"
        load.rearm()
        load.value = "v2"
        out: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(out, outcome_of(a.get("k", force_refresh=True))))
            await load.started.wait()
            tg.start_soon(lambda: _append(out, outcome_of(b.get("k", force_refresh=True))))
            await until(lambda: following(b, "k"))
            assert await b.cancel("k") is True
        assert len(out) == 2 and all(isinstance(v, LoadCancelled) for v in out), out
        for pf in (a, b):
            snap = await pf.status("k")
            assert snap.status is Status.COMPLETED and snap.result == "v1"
            assert await pf.get("k") == "v1"
        assert load.calls == 2


async def test_invalidate_from_a_bystander_detaches_the_run_on_every_instance() -> None:
    server = MemoryServer()
    old = Gate("old")
    async with instances(lambda: mem(server), old, 3) as (a, b, c):
        got: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(got, a.get("k")))
            await old.started.wait()
            assert (await c.status("k")).status is Status.RUNNING
            await c.invalidate("k")

            async def nowhere_running() -> bool:
                return all([not await status_is(pf, "k", Status.RUNNING) for pf in (a, b, c)])

            await until(nowhere_running)  # the detached run is reported nowhere
            new = Gate("new")
            new.release.set()
            assert await b.get("k", new, "k") == "new"
            old.release.set()
        assert got == ["old"]  # its own waiters still get the detached run's value
        for pf in (a, b, c):
            assert await pf.get("k") == "new"  # it was never stored
        assert (old.calls, new.calls) == (1, 1)


async def test_a_hanging_load_is_ended_by_cancel_from_another_instance() -> None:
    server = MemoryServer()
    ended = anyio.Event()

    async def hang(key: Hashable) -> Any:
        try:
            await anyio.sleep_forever()
        finally:
            ended.set()

    async with instances(lambda: mem(server), hang, 2) as (a, b):
        out: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(out, outcome_of(a.get("k", timeout=30))))
            await until(lambda: status_is(b, "k", Status.RUNNING))
            with pytest.raises(TimeoutError):
                await b.get("k", timeout=0.05)  # a timeout affects that caller only
            assert (await a.status("k")).status is Status.RUNNING
            assert await b.cancel("k") is True
            with anyio.fail_after(5):
                await ended.wait()  # the load's task itself was cancelled
        assert len(out) == 1 and isinstance(out[0], LoadCancelled)
        assert a.in_flight() == [] and b.in_flight() == []


async def test_a_load_that_cancels_its_own_key_ends_its_waiters_on_every_instance() -> None:
    server = MemoryServer()
    holder: list[Prefetcher[Any, Any]] = []
    began = anyio.Event()
    go = anyio.Event()

    async def self_cancelling(key: Hashable) -> Any:
        began.set()
        await go.wait()
        await holder[0].cancel(key)
        await anyio.sleep_forever()

    async with instances(lambda: mem(server), self_cancelling, 2) as (a, b):
        holder.append(a)
        out: list[Any] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                await began.wait()  # A holds the lease
                tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                await until(lambda: following(b, "k"))
                go.set()
        assert len(out) == 3 and all(isinstance(v, LoadCancelled) for v in out), out
        assert (await a.status("k")).status is Status.NOT_STARTED


# -- takeover and fences -----------------------------------------------------------------------


async def test_an_owner_that_stops_renewing_is_taken_over_once_after_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = MemoryServer()
    stale = Gate("stale")
    fresh = Gate("fresh")
    fresh.release.set()
    sa, sb, sc = (mem(server, lease=0.3) for _ in range(3))

    async def frozen(*args: Any, **kwargs: Any) -> bool:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(sa._backend, "renew", frozen)  # A's process stops renewing
    with capture_logs() as logs:
        async with (
            Prefetcher(stale, store=sa, name="a") as a,
            Prefetcher(fresh, store=sb, name="b") as b,
            Prefetcher(fresh, store=sc, name="c") as c,
        ):
            got: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _append(got, a.get("k")))
                await stale.started.wait()
                with anyio.fail_after(10):
                    values = [None, None]

                    async def on(i: int, pf: Prefetcher[Any, Any]) -> None:
                        values[i] = await pf.get("k")

                    async with anyio.create_task_group() as inner:
                        inner.start_soon(on, 0, b)
                        inner.start_soon(on, 1, c)
                assert values == ["fresh", "fresh"]
                assert fresh.calls == 1  # one takeover, not one per waiting instance
                stale.release.set()
            assert got == ["stale"]  # the stale owner's own waiters get its value
            for pf in (a, b, c):
                assert await pf.get("k") == "fresh"  # ... which was not stored
    (f_stale,), (f_fresh,) = stale.fences, fresh.fences
    assert f_stale is not None and f_fresh is not None and f_fresh > f_stale
    assert any(e["event"] == "prefetch.store_lease_lost" for e in logs)


async def test_fences_grow_across_lose_everything_even_mid_load() -> None:
    server = MemoryServer()
    first = Gate("first")
    second = Gate("second")
    second.release.set()
    async with instances(lambda: mem(server), first, 2) as (a, b):
        with capture_logs():
            got: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _append(got, a.get("k")))
                await first.started.wait()
                server.lose_everything()  # a restart without persistence
                assert await b.get("k", second, "k") == "second"
                first.release.set()
            assert got == ["first"]
            assert await a.get("k") == "second"
            server.lose_everything()
            third = Gate("third")
            third.release.set()
            assert await a.get("k", third, "k") == "third"
    fences = [f for f in (first.fences[0], second.fences[0], third.fences[0]) if f is not None]
    assert len(fences) == 3
    assert fences == sorted(fences) and len(set(fences)) == 3, fences


# -- outages -----------------------------------------------------------------------------------


async def test_a_value_completed_during_an_outage_reaches_every_local_waiter_at_once() -> None:
    server = MemoryServer()
    load = Gate({"done": True})
    async with instances(lambda: mem(server, lease=5.0), load, 2) as (a, b):
        out = Outcomes()
        with capture_logs():
            async with anyio.create_task_group() as tg:
                a.prefetch("k")
                await load.started.wait()
                for _ in range(3):
                    tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                    tg.start_soon(lambda: _append(out, outcome_of(a.serve("k"))))
                await anyio.wait_all_tasks_blocked()
                server.down = True
                load.release.set()
                with anyio.fail_after(5):
                    await out.reach(6)  # every waiter here, while the store is still down
                server.down = False
        values = [v.value if hasattr(v, "source") else v for v in out]
        assert values == [{"done": True}] * 6, out
        await until(lambda: status_is(b, "k", Status.COMPLETED))  # the write landed after
        assert await b.get("k") == {"done": True}
        assert load.calls == 1


async def test_followers_on_two_instances_ride_out_an_outage_then_get_the_value() -> None:
    server = MemoryServer()
    load = Gate("after")
    async with instances(lambda: mem(server, lease=5.0), load, 3) as (a, b, c):
        out: list[Any] = []
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                a.prefetch("k")
                await load.started.wait()
                for pf in (b, c):
                    for _ in range(2):
                        tg.start_soon(_append, out, outcome_of(pf.get("k")))
                await until(lambda: following(b, "k"))
                await until(lambda: following(c, "k"))
                server.down = True
                server.notify_all()  # every waiter re-reads now, into the outage
                await anyio.sleep(0.5)
                server.down = False
                load.release.set()
        assert out == ["after"] * 4
        assert load.calls == 1
        follow_lines = [e for e in logs if e["event"] == "prefetch.store_unavailable"]
        # rate-limited: one line a second per operation per instance at most
        assert len(follow_lines) <= 2 * 2, follow_lines


async def test_a_follower_past_the_lease_in_an_outage_ends_with_store_error() -> None:
    server = MemoryServer()
    load = Gate("v")
    async with instances(lambda: mem(server, lease=0.4), load, 2) as (a, b):
        with capture_logs():
            out = Outcomes()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                await load.started.wait()
                tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                await until(lambda: following(b, "k"))
                server.down = True
                server.notify_all()
                with anyio.fail_after(5):
                    await out.reach(1)
                (b_out,) = out
                assert isinstance(b_out, StoreError) and b_out.__cause__ is not None
                load.release.set()  # the owner's waiter gets its value all the same
            server.down = False
        assert out[1] == "v"


async def test_wait_on_another_instance_rides_out_an_outage_while_the_lease_lives() -> None:
    server = MemoryServer()
    load = Gate("v")
    async with instances(lambda: mem(server, lease=10.0), load, 2) as (a, b):
        async with anyio.create_task_group() as tg:
            a.prefetch("k")
            await load.started.wait()
            got: list[Any] = []

            async def waiting() -> None:
                got.append(await outcome_of(b.wait("k", timeout=10)))

            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            with capture_logs():
                server.down = True
                server.notify_all()  # a wake-up reaches the waiter during the outage
                await anyio.sleep(0.3)  # (the Redis reader sends one when its link drops)
                server.down = False
            load.release.set()
        (snap,) = got
        assert not isinstance(snap, BaseException), snap
        assert snap.status is Status.COMPLETED and snap.result == "v"


async def test_store_available_logs_are_rate_limited_while_the_store_flaps() -> None:
    server = MemoryServer()

    async def quick(key: Hashable) -> Any:
        return "v"

    async with instances(lambda: mem(server, fallback="local"), quick, 1) as (a,):
        with capture_logs() as logs:
            began = anyio.current_time()
            for i in range(50):
                server.down = i % 2 == 0
                await a.get(("k", i))
            server.down = False
            elapsed = anyio.current_time() - began
    by_event: dict[str, int] = {}
    for e in logs:
        by_event[e["event"]] = by_event.get(e["event"], 0) + 1
    assert by_event.get("prefetch.store_available", 0) <= elapsed + 2, (by_event, elapsed)


async def test_prefetch_starts_again_once_a_store_known_down_answers() -> None:
    server = MemoryServer()
    load = Gate("v")
    load.release.set()
    async with instances(lambda: mem(server), load, 1) as (a,):
        with capture_logs():
            server.down = True
            with pytest.raises(StoreError):
                await a.get("x")  # now known down: prefetch starts nothing meanwhile
            assert a.prefetch("k") is False
            server.down = False
        # prefetch is synchronous: it learns that the store answers again from the next
        # call that reaches it (or by itself within a second)
        assert (await a.status("x")).status is Status.NOT_STARTED
        assert a.prefetch("k") is True  # the store answers again: so does prefetch
        assert (await a.wait("k", timeout=5)).status is Status.COMPLETED
        assert load.calls == 1


async def test_prefetch_past_refresh_after_reloads_as_with_no_store() -> None:
    server = MemoryServer()
    results: dict[str, bool] = {}
    for name, store in (("no store", None), ("shared store", mem(server))):
        load = Gate("v1")
        load.release.set()
        async with Prefetcher(load, store=store, refresh_after=0.05) as pf:
            assert await pf.get("k") == "v1"
            await anyio.sleep(0.1)  # the value ages past refresh_after
            load.rearm()
            load.release.set()
            results[name] = pf.prefetch("k")
            if results[name]:
                with anyio.fail_after(5):
                    await load.started.wait()  # the reload ran
    assert results == {"no store": True, "shared store": True}


# -- fallback="local" --------------------------------------------------------------------------


async def test_fallback_local_two_instances_each_run_once_and_the_store_is_used_again() -> None:
    server = MemoryServer()
    load = Gate("v")
    load.release.set()
    async with instances(lambda: mem(server, fallback="local"), load, 2) as (a, b):
        with capture_logs():
            server.down = True
            async with anyio.create_task_group() as tg:
                for pf in (a, b):
                    for _ in range(10):
                        tg.start_soon(pf.get, "hot")
                    pf.prefetch("hot")
            assert load.calls == 2  # one execution per key per instance while down
            for pf in (a, b):
                assert (await pf.serve("hot")).source is Source.HIT
                assert (await pf.status("hot")).status is Status.COMPLETED
            assert load.calls == 2
            server.down = False
        assert (await a.status("cold")).status is Status.NOT_STARTED  # the store answers
        load.value = "shared"
        assert await a.get("cold") == "shared"
        assert await b.get("cold") == "shared"
        assert load.calls == 3  # one execution across both instances again


async def test_fallback_local_within_failure_ttl_raises_the_same_exception_during_an_outage() -> (
    None
):
    server = MemoryServer()
    load = Gate()
    load.error = ValueError("bad")
    load.release.set()
    async with instances(lambda: mem(server, fallback="local"), load, 1, failure_ttl=60) as (a,):
        with capture_logs():
            server.down = True
            with pytest.raises(ValueError) as first:
                await a.get("k")
            with pytest.raises(ValueError) as again:
                await a.get("k")
            server.down = False
        assert again.value is first.value
        assert load.calls == 1


async def test_fallback_local_a_kept_value_steps_aside_once_the_store_answers_again() -> None:
    server = MemoryServer()
    load = Gate("during")
    load.release.set()
    async with (
        Prefetcher(load, store=mem(server, fallback="local"), name="a") as a,
        Prefetcher(load, store=mem(server), name="b") as b,
    ):
        with capture_logs():
            server.down = True
            assert await a.get("k") == "during"
            server.down = False
        load.value = "after"
        assert await b.get("k") == "after"  # the store's truth now
        assert await a.get("k") == "after"


# -- hostile loads, keys and values ------------------------------------------------------------


async def test_a_base_exception_subclass_from_a_load_reaches_its_waiters_as_itself() -> None:
    server = MemoryServer()
    err = Odd("odd")

    async def odd(key: Hashable) -> Any:
        await anyio.lowlevel.checkpoint()
        raise err

    async with instances(lambda: mem(server), odd, 1) as (a,):
        with anyio.fail_after(5), pytest.raises(Odd) as caught:
            await a.get("k")
        assert caught.value is err
        assert (await a.status("k")).status is Status.FAILED
        ok = Gate("ok")
        ok.release.set()
        assert await a.get("j", ok, "j") == "ok"


async def test_keyboard_interrupt_from_a_load_with_a_store_leaves_the_block_as_itself() -> None:
    server = MemoryServer()
    hang = Gate()
    outside: list[BaseException] = []

    async def interrupt(key: Hashable) -> Any:
        await anyio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    with anyio.fail_after(3):
        async with anyio.create_task_group() as outer:
            with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the block itself is under test
                async with Prefetcher(hang, store=mem(server)) as pf:

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


async def test_a_load_returning_a_non_awaitable_fails_it_on_every_instance_alike() -> None:
    server = MemoryServer()

    async def real(key: Hashable) -> Any:
        return key

    def not_async(key: Hashable) -> Any:  # looks like a coroutine function (__wrapped__)
        return "plain"

    not_async.__wrapped__ = real  # type: ignore[attr-defined]

    ok = Gate("ok")
    ok.release.set()
    async with instances(lambda: mem(server), ok, 2) as (a, b):
        with pytest.raises(TypeError, match="not an awaitable"):
            await a.get("k", not_async, "k")
        for pf in (a, b):
            snap = await pf.status("k")
            assert snap.status is Status.FAILED and snap.error is not None
            assert snap.error.startswith("TypeError")
        assert await b.get("k") == "ok"
        assert await a.get("k") == "ok"


async def test_odd_progress_values_fail_only_that_load_and_good_ones_reach_others() -> None:
    server = MemoryServer()
    calls: list[str] = []

    async def odd(key: Hashable) -> Any:
        calls.append(str(key))
        report_progress(1, 2, "x" * 10_000)  # big message: fine
        report_progress(0.5, None, "\n\0 odd \u2028")
        if key == "nan":
            report_progress(float("nan"))
        if key == "over":
            report_progress(3, 2)
        if key == "type":
            report_progress(1, 2, 7)  # type: ignore[arg-type]
        return "ok"

    async with instances(lambda: mem(server), odd, 2) as (a, b):
        with pytest.raises(ValueError):
            await a.get("nan")
        with pytest.raises(ValueError):
            await a.get("over")
        with pytest.raises(TypeError):
            await a.get("type")
        for key, kind in (("nan", "ValueError"), ("over", "ValueError"), ("type", "TypeError")):
            snap = await b.status(key)
            assert snap.status is Status.FAILED and snap.error is not None
            assert snap.error.startswith(kind)
        assert await a.get("good") == "ok"
        assert await b.get("good") == "ok"
        assert calls == ["nan", "over", "type", "good"]


async def test_a_load_that_cancels_its_own_task_fails_only_that_load_with_a_store(
    anyio_backend: str,
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio.current_task().cancel() exists only on asyncio")
    server = MemoryServer()

    async def self_cancel(key: Hashable) -> Any:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)
        return "never"

    ok = Gate("ok")
    ok.release.set()
    with anyio.fail_after(10):
        async with instances(lambda: mem(server), ok, 2) as (a, b):
            with pytest.raises(BaseException):  # noqa: B017 - whatever it raised, here only
                await a.get("bad", self_cancel, "bad")
            assert await a.get("fine") == "ok"
            assert await b.get("bad") == "ok"  # nothing of it stays in the store's way
            assert (await a.status("bad")).status is Status.COMPLETED


async def test_a_load_that_gets_its_own_key_fails_with_reentrant_load_error_only() -> None:
    server = MemoryServer()
    holder: list[Prefetcher[Any, Any]] = []

    async def reentrant(key: Hashable) -> Any:
        pf = holder[0]
        if key == "outer":
            assert await pf.get("inner") == "v-inner"  # another key from inside a load: fine
            await pf.get("outer")  # its own key: refused at once
        return f"v-{key}"

    async with instances(lambda: mem(server), reentrant, 2) as (a, b):
        holder.append(a)
        with anyio.fail_after(5):
            with pytest.raises(ReentrantLoadError):
                await a.get("outer")
        assert await b.get("inner") == "v-inner"  # the nested load was stored for everyone
        assert (await b.status("outer")).status is Status.FAILED


async def test_a_value_the_codec_cannot_encode_fails_everywhere_as_codec_error() -> None:
    server = MemoryServer()

    class StrCodec:
        def encode(self, value: Any) -> bytes:
            return str(value)  # type: ignore[return-value]  # not bytes: a broken codec

        def decode(self, data: bytes) -> Any:
            return data

    gate = Gate({1, 2})  # a set: JSON cannot hold it
    async with (
        Prefetcher(gate, store=mem(server), name="a") as a,
        Prefetcher(gate, store=mem(server), name="b") as b,
        Prefetcher(gate, store=mem(server, codec=StrCodec()), name="s") as s,
    ):
        out: list[Any] = []
        async with anyio.create_task_group() as tg:
            a.prefetch("k")
            await gate.started.wait()
            tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
            await until(lambda: following(b, "k"))
            gate.release.set()
        (remote,) = out
        assert isinstance(remote, RemoteLoadError) and remote.error_type == "CodecError"
        for pf in (a, b):
            snap = await pf.status("k")
            assert snap.status is Status.FAILED
            assert snap.error is not None and snap.error.startswith("CodecError")
        with pytest.raises(CodecError):
            await s.get("j")
        assert gate.calls == 2


async def test_an_undecodable_stored_value_is_loaded_again() -> None:
    server = MemoryServer()
    load = Gate("fresh")
    load.release.set()
    async with instances(lambda: mem(server), load, 1) as (a,):
        d = digest_of("k")
        entry = server.entries[d] = _Entry()
        now = time.time()
        entry.outcome = _Slot(
            Outcome(True, new_token(), 1, now, now, False, payload=b"\xff not json"), None
        )
        with capture_logs() as logs:
            with anyio.fail_after(5):
                assert await a.get("k") == "fresh"
        assert any(e["event"] == "prefetch.store_corrupt_entry" for e in logs)
        assert load.calls == 1


async def test_an_unsupported_key_is_refused_everywhere_without_a_store_round_trip() -> None:
    server = MemoryServer()
    load = Gate()
    async with instances(lambda: mem(server), load, 1) as (a,):
        before = server.operations
        deep: Any = "x"
        for _ in range(40):
            deep = (deep,)
        for key in (frozenset({1}), deep, ("ok", b"bytes"), 1j):
            with pytest.raises(TypeError, match="key"):
                await a.get(key)
            with pytest.raises(TypeError, match="key"):
                a.prefetch(key)
            with pytest.raises(TypeError, match="key"):
                await a.status(key)
            with pytest.raises(TypeError, match="key"):
                await a.cancel(key)
            with pytest.raises(TypeError, match="key"):
                await a.invalidate(key)
            with pytest.raises(TypeError, match="key"):
                await a.wait(key)
        assert server.operations == before
        assert a.stats().total == 0 and a.in_flight() == []


async def test_calls_from_a_thread_raise_wrong_thread_and_touch_no_store() -> None:
    server = MemoryServer()
    load = Gate("v")
    load.release.set()
    async with instances(lambda: mem(server), load, 1) as (a,):
        before = server.operations

        def from_thread() -> list[BaseException]:
            errors: list[BaseException] = []
            for call in (
                lambda: a.prefetch("k"),
                lambda: asyncio.run(a.get("k")),
                lambda: asyncio.run(a.status("k")),
                lambda: asyncio.run(a.cancel("k")),
                lambda: asyncio.run(a.invalidate("k")),
            ):
                try:
                    call()
                except BaseException as exc:  # what each refused call raised
                    errors.append(exc)
            return errors

        errors = await anyio.to_thread.run_sync(from_thread)
        assert len(errors) == 5 and all(isinstance(e, WrongThreadError) for e in errors), errors
        assert server.operations == before  # no store round trip for a refused call
        assert a.stats().misses == 0 and a.in_flight() == []

        def through_the_loop() -> Any:
            return anyio.from_thread.run(a.get, "k")

        assert await anyio.to_thread.run_sync(through_the_loop) == "v"
        assert load.calls == 1


# -- closing -----------------------------------------------------------------------------------


async def test_a_store_closed_mid_load_ends_every_waiter_and_the_prefetcher_closes() -> None:
    server = MemoryServer()
    load = Gate("v")
    store = mem(server)
    out: list[Any] = []
    with capture_logs(), anyio.fail_after(10):
        async with (
            Prefetcher(load, store=store) as a,
            Prefetcher(load, store=mem(server)) as b,
            anyio.create_task_group() as tg,
        ):
            for _ in range(3):
                tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
            await load.started.wait()
            tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
            await until(lambda: following(b, "k"))
            await store.aclose()  # closed under the Prefetcher's feet
            load.release.set()
    assert len(out) == 4  # every waiter ended, and both blocks returned
    assert out.count("v") >= 3, out  # the owner's own waiters got the value
    assert all(v == "v" or isinstance(v, Exception) for v in out), out


async def test_closing_a_follower_instance_ends_its_waiters_and_leaves_the_run_alone() -> None:
    server = MemoryServer()
    load = Gate("v")
    out: list[Any] = []
    waited: list[Any] = []
    async with Prefetcher(load, store=mem(server), name="a") as a:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(out, a.get("k")))
            await load.started.wait()
            stack = contextlib.AsyncExitStack()
            b = await stack.enter_async_context(Prefetcher(load, store=mem(server), name="b"))
            c = await stack.enter_async_context(Prefetcher(load, store=mem(server), name="c"))
            for pf in (b, c):
                tg.start_soon(_append, out, outcome_of(pf.get("k")))
            tg.start_soon(lambda: _append(waited, outcome_of(c.wait("k"))))
            await until(lambda: following(b, "k"))
            await until(lambda: following(c, "k"))
            await stack.aclose()  # B and C leave their blocks while following A's run
            assert sorted(type(v).__name__ for v in out) == ["PrefetcherClosed"] * 2, out
            (w,) = waited
            assert isinstance(w, PrefetcherClosed)
            assert (await a.status("k")).status is Status.RUNNING  # A's run goes on
            load.release.set()
        assert out[-1] == "v"
    async with Prefetcher(load, store=mem(server)) as d:
        assert await d.get("k") == "v"  # stored
    assert load.calls == 1


async def test_closing_a_bystander_ends_its_remote_wait_promptly() -> None:
    server = MemoryServer()
    load = Gate("v")
    async with Prefetcher(load, store=mem(server), name="a") as a:
        a.prefetch("k")
        await load.started.wait()
        waited = Outcomes()
        async with anyio.create_task_group() as tg:
            stack = contextlib.AsyncExitStack()
            c = await stack.enter_async_context(Prefetcher(load, store=mem(server), name="c"))
            tg.start_soon(lambda: _append(waited, outcome_of(c.wait("k"))))
            await anyio.wait_all_tasks_blocked()
            began = anyio.current_time()
            await stack.aclose()
            with anyio.fail_after(5):
                await waited.reach(1)
            assert anyio.current_time() - began < 0.5  # well before wait()'s 1 s re-read
        (w,) = waited
        assert isinstance(w, PrefetcherClosed)
        load.release.set()
        assert (await a.wait("k", timeout=5)).status is Status.COMPLETED


async def test_shutdown_grace_lets_the_owner_store_its_result_for_its_followers() -> None:
    server = MemoryServer()
    load = Gate("graced")
    out: list[Any] = []
    released_while: list[str] = []

    async def release_while_closing(a: Prefetcher[Any, Any]) -> None:
        await anyio.wait_all_tasks_blocked()  # A's block is being left: its grace runs
        released_while.append(a._state)
        load.release.set()

    async with Prefetcher(load, store=mem(server), name="b") as b:
        async with (
            anyio.create_task_group() as tg,
            Prefetcher(load, store=mem(server), name="a", shutdown_grace=10) as a,
        ):
            a.prefetch("k")
            await load.started.wait()
            tg.start_soon(lambda: _append(out, b.get("k")))
            await until(lambda: following(b, "k"))
            tg.start_soon(release_while_closing, a)
        assert released_while == ["closing"]
        assert out == ["graced"]
        assert load.calls == 1
        assert (await b.serve("k")).source is Source.HIT  # A wrote it before its block returned


async def test_past_shutdown_grace_a_follower_takes_the_run_over() -> None:
    server = MemoryServer()
    first = Gate("first")
    second = Gate("second")
    second.release.set()
    out: list[Any] = []
    async with Prefetcher(second, store=mem(server), name="b") as b:
        async with anyio.create_task_group() as tg:
            with capture_logs() as logs:
                async with Prefetcher(first, store=mem(server), name="a", shutdown_grace=0.1) as a:
                    a.prefetch("k")
                    await first.started.wait()
                    tg.start_soon(lambda: _append(out, b.get("k")))
                    await until(lambda: following(b, "k"))
        assert any(e["event"] == "prefetch.cancelled" and e["reason"] == "close" for e in logs)
        assert out == ["second"]
        assert (first.calls, second.calls) == (1, 1)


# -- a real Redis ------------------------------------------------------------------------------


@pytest.mark.redis
class TestRedis:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    async def test_one_execution_across_three_instances(self, redis_server: RedisServer) -> None:
        load = Gate({"n": 1})
        got: list[Any] = []
        async with (
            instances(lambda: rstore(redis_server), load, 3) as (a, b, c),
            anyio.create_task_group() as tg,
        ):
            a.prefetch("k")
            for pf in (a, b, c):
                tg.start_soon(_append, got, pf.get("k"))
                tg.start_soon(_append, got, pf.get("k", force_refresh=True))
                pf.prefetch("k")
            await load.started.wait()
            await until(lambda: _followers(2, a, b, c))  # whichever owns, the others follow
            load.release.set()
        assert load.calls == 1
        assert got == [{"n": 1}] * 6

    async def test_no_secret_in_repr_errors_or_logs(self, redis_server: RedisServer) -> None:
        secret = "s3cr3t-Pw"
        redis_server.command("CONFIG", "SET", "requirepass", secret)
        port = redis_server.port
        urls = [
            f"redis://:{secret}@127.0.0.1:{port}/0",
            f"redis://default:{secret}@127.0.0.1:{port}/0",
            f"redis://127.0.0.1:{port}/0?password={secret}",
        ]
        texts: list[str] = []
        load = Gate("v")
        load.release.set()
        with capture_logs() as logs:
            for i, url in enumerate(urls):
                store = RedisStore(url, fallback="local", poll_interval=0.05)
                texts.append(repr(store))
                async with Prefetcher(load, store=store) as pf:
                    assert await pf.get(("k", i)) == "v"
                    texts.append(repr(pf._remote))
            redis_server.kill()
            for url in urls:
                async with Prefetcher(load, store=RedisStore(url, fallback="local")) as pf:
                    assert await pf.get("down") == "v"  # logged, run here
                with pytest.raises(StoreError) as caught:
                    async with Prefetcher(load, store=RedisStore(url)):
                        pass
                texts.extend(traceback.format_exception(caught.value))
                texts.append(repr(caught.value))
        texts.extend(str(e) for e in logs)
        assert logs and any(e["event"] == "prefetch.store_unavailable" for e in logs)
        leaks = [t for t in texts if secret in t]
        assert not leaks, leaks[:3]

    async def test_a_redis_restart_without_data_mid_load_keeps_fences_growing(
        self, redis_server: RedisServer
    ) -> None:
        first = Gate("first")
        second = Gate("second")
        second.release.set()
        with capture_logs():
            async with instances(lambda: rstore(redis_server, lease=5.0), first, 2) as (a, b):
                got: list[Any] = []
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda: _append(got, a.get("k")))
                    await first.started.wait()
                    await anyio.to_thread.run_sync(redis_server.restart)  # loses every key
                    with anyio.fail_after(10):
                        assert await b.get("k", second, "k") == "second"
                    first.release.set()
                assert got == ["first"]
                for pf in (a, b):
                    assert await pf.get("k") == "second"  # the stale owner did not overwrite
        (f1,), (f2,) = first.fences, second.fences
        assert f1 is not None and f2 is not None and f2 > f1

    async def test_a_follower_rides_out_a_paused_redis_while_the_lease_lives(
        self, redis_server: RedisServer
    ) -> None:
        load = Gate("after the pause")
        with capture_logs():
            async with instances(lambda: rstore(redis_server, lease=3.0), load, 2) as (a, b):
                out: list[Any] = []
                async with anyio.create_task_group() as tg:
                    a.prefetch("k")
                    await load.started.wait()
                    tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                    await until(lambda: following(b, "k"))
                    redis_server.pause()
                    try:
                        await anyio.sleep(0.5)
                    finally:
                        redis_server.resume()
                    load.release.set()
                assert out == ["after the pause"]
        assert load.calls == 1

    async def test_a_value_completed_while_redis_is_killed_reaches_its_waiters(
        self, redis_server: RedisServer
    ) -> None:
        load = Gate("v")
        with capture_logs():
            async with instances(lambda: rstore(redis_server, lease=2.0), load, 2) as (a, b):
                out = Outcomes()
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                    await load.started.wait()
                    tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                    await until(lambda: following(b, "k"))
                    redis_server.kill()
                    load.release.set()
                    with anyio.fail_after(1.5):  # at once, not after the retries
                        await out.reach(3)
                assert out[:3] == ["v"] * 3
                assert isinstance(out[3], StoreError)  # past the lease: the follower gives up

    async def test_a_value_completed_while_redis_is_paused_reaches_its_waiters_within_the_lease(
        self, redis_server: RedisServer
    ) -> None:
        load = Gate("v")
        lease = 2.0
        with capture_logs():
            async with instances(lambda: rstore(redis_server, lease=lease), load, 1) as (a,):
                out = Outcomes()
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                    await load.started.wait()
                    redis_server.pause()
                    try:
                        load.release.set()
                        with anyio.move_on_after(lease + 1.0):
                            await out.reach(2)
                        early = list(out)
                    finally:
                        redis_server.resume()
                assert early == ["v", "v"]

    async def test_wait_on_a_bystander_rides_out_a_redis_restart_while_the_lease_lives(
        self, durable_redis: RedisServer
    ) -> None:
        load = Gate("v")
        with capture_logs():
            async with instances(lambda: rstore(durable_redis, lease=10.0), load, 2) as (a, c):
                waited: list[Any] = []
                async with anyio.create_task_group() as tg:
                    a.prefetch("k")
                    await load.started.wait()
                    tg.start_soon(lambda: _append(waited, outcome_of(c.wait("k", timeout=20))))
                    await anyio.wait_all_tasks_blocked()
                    await anyio.to_thread.run_sync(durable_redis.stop)
                    await anyio.sleep(1.3)  # past wait()'s own 1 s re-read: it reads in the outage
                    await anyio.to_thread.run_sync(durable_redis.start)
                    load.release.set()
                (snap,) = waited
                assert not isinstance(snap, BaseException), snap
                assert snap.status is Status.COMPLETED

    async def test_a_store_closed_mid_load_still_hands_the_value_to_its_waiters(
        self, redis_server: RedisServer
    ) -> None:
        load = Gate("v")
        store = rstore(redis_server, lease=2.0)
        out = Outcomes()
        with capture_logs(), anyio.fail_after(15):
            async with (
                Prefetcher(load, store=store) as a,
                Prefetcher(load, store=rstore(redis_server, lease=2.0)) as b,
            ):
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(lambda: _append(out, outcome_of(a.get("k"))))
                    await load.started.wait()
                    tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                    await until(lambda: following(b, "k"))
                    await store.aclose()  # closed under the Prefetcher's feet
                    load.release.set()
                    with anyio.fail_after(2):
                        await out.reach(2)
                assert out[:2] == ["v", "v"]
                assert out[2] == "v" or isinstance(out[2], StoreError), out

    async def test_an_exception_with_odd_bytes_is_reported_alike_everywhere(
        self, redis_server: RedisServer
    ) -> None:
        odd_type = type("Ошибка", (Exception,), {})
        error = odd_type("nul \0 surrogate \ud800 newline \n end")
        load = Gate()
        load.error = error
        async with instances(lambda: rstore(redis_server), load, 3) as (a, b, c):
            out: list[Any] = []
            async with anyio.create_task_group() as tg:
                a.prefetch("k")
                await load.started.wait()
                tg.start_soon(lambda: _append(out, outcome_of(b.get("k"))))
                await until(lambda: following(b, "k"))
                load.release.set()
            (remote,) = out
            assert isinstance(remote, RemoteLoadError)
            assert remote.error_type == "Ошибка"
            assert remote.message is not None and remote.message.startswith("nul \0 surrogate")
            assert remote.message.endswith("newline \n end")
            snaps = [await pf.status("k") for pf in (a, b, c)]
            assert snaps[0].status is Status.FAILED
            assert all(s == snaps[0] for s in snaps), snaps
            assert snaps[0].error is not None and snaps[0].error.startswith("Ошибка: nul")

    async def test_a_corrupt_record_is_ignored_and_the_key_loaded_again(
        self, redis_server: RedisServer
    ) -> None:
        load = Gate("fresh")
        load.release.set()
        name = f"prefetch_ingest:{{{digest_of('k')}}}:r"
        redis_server.command("SET", name, b"Xc this is not a record of the library")
        with capture_logs():
            async with instances(lambda: rstore(redis_server), load, 1) as (a,):
                got: Any = "<no answer within 5 s>"
                with anyio.move_on_after(5):
                    got = await a.get("k")
        assert got == "fresh"

    async def test_the_applications_own_client_is_never_closed_by_the_store(
        self, redis_server: RedisServer
    ) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_server.url)
        try:
            load = Gate("v")
            load.release.set()
            async with (
                Prefetcher(load, store=RedisStore(client, poll_interval=0.05)) as a,
                Prefetcher(load, store=RedisStore(client, poll_interval=0.05)) as b,
            ):
                assert await a.get("k") == "v"
                assert await b.get("k") == "v"
                assert load.calls == 1
            assert await client.ping()
            async with Prefetcher(load, store=RedisStore(client)) as c:
                assert await c.get("k") == "v"
            assert await client.ping()
        finally:
            await client.aclose()
