"""Adversarial tests, final round: the lease bounds (lease / 3), MemoryServer.stall(),
freshness marks from a writer's clock, and the example's environment parsing."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Hashable
from typing import Any

import anyio
import pytest

from prefetch_ingest import Prefetcher
from prefetch_ingest.stores.codec import JSONCodec
from prefetch_ingest.stores.interface import Outcome
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore, _Entry, _Slot

pytestmark = pytest.mark.anyio


def _plant(server: MemoryServer, digest: str, **kw: Any) -> None:
    now = time.time()
    fields: dict[str, Any] = {
        "ok": True,
        "token": "planted",
        "fence": 1,
        "started_at": now - 1.0,
        "completed_at": now,
        "background": False,
        "payload": JSONCodec().encode("planted"),
    }
    fields.update(kw)
    e = server.entries.setdefault(digest, _Entry())
    e.outcome = _Slot(Outcome(**fields), None)


async def _load(key: Hashable) -> str:
    return "fresh"


async def test_nan_completion_time_is_not_fresh_forever() -> None:
    server = MemoryServer()
    store = MemoryStore(server)
    async with Prefetcher(_load, store=store) as p:
        _plant(server, store._digest("k"), completed_at=math.nan)
        assert await p.get("k") == "planted"
        # a completion at an unknown time: its age is unknown, as with a clock ahead
        assert store.worth_starting("k", refresh_after=0.0) != "no"


async def test_future_completion_time_is_not_trusted() -> None:
    server = MemoryServer()
    store = MemoryStore(server)
    async with Prefetcher(_load, store=store) as p:
        _plant(server, store._digest("k"), completed_at=time.time() + 3600)
        assert await p.get("k") == "planted"
        assert store.worth_starting("k", refresh_after=0.0) != "no"


async def test_stall_mid_completion_delivers_and_leaves_no_lease() -> None:
    server = MemoryServer()
    release = anyio.Event()
    started = anyio.Event()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return f"v{calls}"

    a_store = MemoryStore(server, lease=0.3, poll_interval=0.05)
    b_store = MemoryStore(server, lease=0.3, poll_interval=0.05)
    async with Prefetcher(load, store=a_store) as a, Prefetcher(load, store=b_store) as b:
        got: list[Any] = []

        async def call() -> None:
            got.append(await a.get("k"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(5):
                await started.wait()
            server.stall()
            release.set()
            with anyio.fail_after(5):
                while not got:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert got == ["v1"]  # delivered to the local caller despite the partition
        server.resume()
        with anyio.fail_after(5):
            value = await b.get("k")
        assert value in ("v1", "v2")


async def test_stall_mid_acquire_then_resume() -> None:
    server = MemoryServer()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        return "v"

    store = MemoryStore(server, lease=0.3, fallback="local")
    other = MemoryStore(server, lease=0.3)
    async with Prefetcher(load, store=store) as a, Prefetcher(load, store=other) as b:
        server.stall()
        with anyio.fail_after(5):
            assert await a.get("k") == "v"  # the partition: loaded here
        server.resume()
        with anyio.fail_after(5):
            assert await b.get("k") == "v"
        assert server.entries.get(store._digest("k")) is None or (
            server.entries[store._digest("k")].run is None
        )


async def test_example_seconds_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_examples import service

    for bad in ("nan", "-1", "inf", "1e400", "-0.5", "NaN", "abc", "-inf"):
        monkeypatch.setenv("SHUTDOWN_GRACE", bad)
        with pytest.raises(ValueError):
            service._seconds("SHUTDOWN_GRACE", 10.0)
    monkeypatch.setenv("SHUTDOWN_GRACE", " 2.5 ")
    assert service._seconds("SHUTDOWN_GRACE", 10.0) == 2.5
    monkeypatch.setenv("SHUTDOWN_GRACE", "")
    assert service._seconds("SHUTDOWN_GRACE", 10.0) == 10.0


@pytest.mark.parametrize("fallback", [None, "local"])
async def test_invalidate_under_stall_is_bounded(fallback: Any) -> None:
    server = MemoryServer()
    store = MemoryStore(server, lease=0.15, fallback=fallback)
    async with Prefetcher(_load, store=store) as p:
        assert await p.get("k") == "fresh"
        server.stall()
        try:
            with anyio.move_on_after(1.0) as scope:
                with contextlib.suppress(Exception):  # a StoreError is an answer; hanging is not
                    await p.invalidate("k")
            assert not scope.cancelled_caught, "invalidate hung for 1 s (lease 0.15)"
        finally:
            server.resume()


@pytest.mark.parametrize("fallback", [None, "local"])
async def test_cancel_under_stall_is_bounded(fallback: Any) -> None:
    server = MemoryServer()
    store = MemoryStore(server, lease=0.15, fallback=fallback)
    async with Prefetcher(_load, store=store) as p:
        assert await p.get("k") == "fresh"
        server.stall()
        try:
            with anyio.move_on_after(1.0) as scope:
                with contextlib.suppress(Exception):
                    await p.cancel("k")
            assert not scope.cancelled_caught, "cancel hung for 1 s (lease 0.15)"
        finally:
            server.resume()


async def test_lookup_under_stall_is_bounded() -> None:
    server = MemoryServer()
    store = MemoryStore(server, lease=0.3, fallback="local")
    async with Prefetcher(_load, store=store) as p:
        server.stall()
        try:
            with anyio.fail_after(3):
                snap = await p.status("k")
            assert snap is not None
        finally:
            server.resume()


async def test_short_stall_does_not_cost_the_lease() -> None:
    """A partition shorter than 2 * lease / 3 - 0.25 s: the owner keeps its lease, the
    follower rides it out, the load runs once and both get its value."""
    server = MemoryServer()
    release = anyio.Event()
    started = anyio.Event()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "v"

    sa = MemoryStore(server, lease=1.2, poll_interval=0.05)
    sb = MemoryStore(server, lease=1.2, poll_interval=0.05)
    async with Prefetcher(load, store=sa) as a, Prefetcher(load, store=sb) as b:
        got: dict[str, Any] = {}

        async def call(name: str, p: Prefetcher[Any, Any]) -> None:
            got[name] = await p.get("k")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a", a)
                await started.wait()
                tg.start_soon(call, "b", b)
                await anyio.sleep(0.45)  # b follows; a renewed at 0.4
                server.stall()
                await anyio.sleep(0.4)
                server.resume()
                await anyio.sleep(0.2)
                release.set()
        assert got == {"a": "v", "b": "v"}
        assert calls == 1


async def test_load_raising_cancelled_itself_is_its_failure() -> None:
    """asyncio only in effect: a load that raises CancelledError on its own (no scope
    cancelled) fails, and that failure is what another instance gets."""
    import sniffio

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("trio.Cancelled cannot be raised by hand")
    import asyncio

    from prefetch_ingest import RemoteLoadError

    server = MemoryServer()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError()

    async with (
        Prefetcher(load, store=MemoryStore(server), failure_ttl=60) as a,
        Prefetcher(load, store=MemoryStore(server), failure_ttl=60) as b,
    ):
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await a.get("k")
        with anyio.fail_after(5), pytest.raises(RemoteLoadError):
            await b.get("k")
        assert calls == 1
        assert await a.status("k") is not None


def _slow(store: MemoryStore, seconds: float) -> None:
    """Every answer of this store takes ``seconds`` (the operation itself lands at once):
    a slow but healthy server, slower than lease / 3 yet far quicker than the lease."""
    backend = store._backend
    for name in ("read", "acquire", "renew", "complete", "release"):
        real = getattr(backend, name)

        async def slow(*args: Any, _real: Any = real, **kw: Any) -> Any:
            answer = await _real(*args, **kw)
            await anyio.sleep(seconds)
            return answer

        setattr(backend, name, slow)


@pytest.mark.xfail(
    strict=True,
    reason="left by design: an operation unanswered for lease / 3 counts as an outage "
    "(docs/stores.md); a store answering in 0.12 s needs a lease above 0.36 s, here 0.3 s",
)
async def test_slow_but_answering_store_is_not_an_outage() -> None:
    server = MemoryServer()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        return "v"

    sa = MemoryStore(server, lease=0.3)
    sb = MemoryStore(server, lease=0.3)
    async with Prefetcher(load, store=sa) as a, Prefetcher(load, store=sb) as b:
        _slow(sa, 0.12)
        _slow(sb, 0.12)
        with anyio.fail_after(5):
            assert await a.get("k") == "v"
            assert await b.get("k") == "v"
        assert calls == 1


@pytest.mark.parametrize("started_at", [math.nan, -math.inf])
async def test_absurd_writer_start_time_does_not_poison_saved_seconds(started_at: float) -> None:
    server = MemoryServer()
    store = MemoryStore(server)
    async with Prefetcher(_load, store=store) as p:
        _plant(server, store._digest("k"), started_at=started_at)
        assert await p.get("k") == "planted"
        assert math.isfinite(p.stats().saved_seconds)


@pytest.mark.parametrize("fallback", [None, "local"])
async def test_stall_mid_completion_with_follower_then_resume(fallback: Any) -> None:
    """The partition starts as the owner completes and ends within the lease: the
    retried completion lands, the follower gets the value, the load ran once."""
    server = MemoryServer()
    release = anyio.Event()
    started = anyio.Event()
    calls = 0

    async def load(key: Hashable) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return f"v{calls}"

    sa = MemoryStore(server, lease=0.9, poll_interval=0.05, fallback=fallback)
    sb = MemoryStore(server, lease=0.9, poll_interval=0.05, fallback=fallback)
    async with Prefetcher(load, store=sa) as a, Prefetcher(load, store=sb) as b:
        got: dict[str, Any] = {}

        async def call(name: str, p: Prefetcher[Any, Any]) -> None:
            got[name] = await p.get("k")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a", a)
                await started.wait()
                tg.start_soon(call, "b", b)
                await anyio.sleep(0.1)
                server.stall()
                release.set()
                while "a" not in got:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                await anyio.sleep(0.1)
                server.resume()
        assert got == {"a": "v1", "b": "v1"}
        assert calls == 1


async def test_close_under_stall_is_bounded_by_the_lease() -> None:
    server = MemoryServer()
    release = anyio.Event()
    started = anyio.Event()

    async def load(key: Hashable) -> str:
        started.set()
        await release.wait()
        return "v"

    store = MemoryStore(server, lease=0.3, fallback="local")
    try:
        with anyio.fail_after(10):
            async with Prefetcher(load, store=store) as p:
                p.prefetch("k")
                await started.wait()
                server.stall()
                release.set()
                assert await p.get("k") == "v"
                t0 = anyio.current_time()
            closed_in = anyio.current_time() - t0
    finally:
        server.resume()
    assert closed_in < 0.3 + 0.3, f"closing took {closed_in:.2f} s"
