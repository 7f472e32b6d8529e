"""Bugs of the shared lease algorithm found by the attack on PostgresStore, reproduced on
the in-memory shared store (the algorithm is the same for every backend).

Each test failed on the code as the attack found it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import pytest

import prefetch_ingest.engine.prefetcher as engine_module
import prefetch_ingest.stores.lease as lease_module
from prefetch_ingest import Prefetcher, Status, StoreError
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore
from tests.stores.test_attack_shared import following, until

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a CancelledError made by hand
async def test_a_load_that_raises_cancelled_error_itself_fails_for_its_followers_too() -> None:
    """A CancelledError the Prefetcher did not cause is the load's failure (as with no
    store): recorded, so that a follower in another instance ends with a failure instead
    of taking the key over and running it a second time."""
    server = MemoryServer()
    started, release = anyio.Event(), anyio.Event()
    calls = 0

    async def self_cancelling(key: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await release.wait()
            raise asyncio.CancelledError("I cancel myself")
        return "second run"

    outcomes: list[Any] = []

    async def on_b(b: Prefetcher[Any, Any]) -> None:
        try:
            outcomes.append(await b.get("k"))
        except BaseException as exc:  # what B got is the assertion
            outcomes.append(exc)

    async with (
        Prefetcher(self_cancelling, store=MemoryStore(server)) as a,
        Prefetcher(self_cancelling, store=MemoryStore(server)) as b,
    ):
        a.prefetch("k")
        await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_b, b)
            await until(lambda: following(b, "k"))
            release.set()
    assert calls == 1, outcomes
    (o,) = outcomes
    assert isinstance(o, Exception), o


class _SkewedTime:
    """The ``time`` module of an instance whose wall clock runs an hour ahead."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.parametrize("skew", [0.0, 3600.0], ids=["same-clock", "writer-an-hour-ahead"])
async def test_the_writers_wall_clock_does_not_make_a_value_fresh_elsewhere(
    monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """A stores a value with ttl=0.3 s while its clock is an hour ahead. Once the server
    expired it, B's prefetch starts a load: TTLs are the store's, no instance's clock
    decides (B took the writer's expiry for its own and said "fresh" for an hour)."""
    server = MemoryServer()
    calls = 0

    async def load(key: Any) -> str:
        nonlocal calls
        calls += 1
        return "v"

    async with (
        Prefetcher(load, store=MemoryStore(server), ttl=0.3) as a,
        Prefetcher(load, store=MemoryStore(server), ttl=0.3) as b,
    ):
        monkeypatch.setattr(lease_module, "time", _SkewedTime(skew))
        assert await a.get("k") == "v"
        monkeypatch.setattr(lease_module, "time", time)
        assert await b.get("k") == "v"  # a hit from the store
        assert calls == 1

        async def expired() -> bool:
            return (await b.status("k")).status is Status.NOT_STARTED

        await until(expired)
        assert b.prefetch("k") is True


@pytest.mark.parametrize("skew", [0.0, 3600.0], ids=["same-clock", "writer-an-hour-ahead"])
async def test_the_writers_wall_clock_does_not_stretch_failure_ttl_elsewhere(
    monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """failure_ttl=0.3 s: a failure recorded by an instance whose clock is an hour ahead
    is not re-raised by B for an hour; once failure_ttl has passed, B's get runs the key."""
    server = MemoryServer()
    calls = 0

    async def load(key: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first fails")
        return "second"

    async with (
        Prefetcher(load, store=MemoryStore(server), failure_ttl=0.3) as a,
        Prefetcher(load, store=MemoryStore(server), failure_ttl=0.3) as b,
    ):
        monkeypatch.setattr(lease_module, "time", _SkewedTime(skew))
        monkeypatch.setattr(engine_module, "time", _SkewedTime(skew))
        with pytest.raises(ValueError):
            await a.get("k")
        monkeypatch.setattr(lease_module, "time", time)
        monkeypatch.setattr(engine_module, "time", time)
        await anyio.sleep(0.5)  # failure_ttl passes (by every clock but A's)
        with anyio.fail_after(5):
            assert await b.get("k") == "second"


async def test_a_partition_is_a_store_error_not_a_hang() -> None:
    """A server that answers nothing (a partition: the connection stays open, no byte
    comes back): a get raises StoreError within lease / 3, it does not hang."""
    server = MemoryServer()

    async def load(key: Any) -> str:
        return "v"

    async with Prefetcher(load, store=MemoryStore(server, lease=0.6)) as pf:
        assert await pf.get("warm") == "v"
        server.stall()
        try:
            with anyio.fail_after(5):
                with pytest.raises(StoreError):
                    await pf.get("warm")  # the hit's read
                with pytest.raises(StoreError):
                    await pf.get("cold")  # the read, then the acquire
        finally:
            server.resume()
        assert await pf.get("cold") == "v"  # the store answers again: used again


async def test_a_partition_with_fallback_local_serves_locally() -> None:
    server = MemoryServer()
    calls = 0

    async def load(key: Any) -> str:
        nonlocal calls
        calls += 1
        return "v"

    async with Prefetcher(load, store=MemoryStore(server, lease=0.6, fallback="local")) as pf:
        server.stall()
        try:
            with anyio.fail_after(5):
                assert await pf.get("k") == "v"
                assert await pf.get("k") == "v"  # kept locally during the outage
        finally:
            server.resume()
    assert calls == 1


async def test_invalidate_and_cancel_in_a_partition_are_store_errors_not_hangs() -> None:
    """Like a get, an invalidate or a cancel that the server never answers raises
    StoreError within lease / 3 (they hung)."""
    server = MemoryServer()

    async def load(key: Any) -> str:
        return "v"

    async with Prefetcher(load, store=MemoryStore(server, lease=0.6)) as pf:
        assert await pf.get("k") == "v"
        server.stall()
        try:
            with anyio.fail_after(5):
                with pytest.raises(StoreError):
                    await pf.invalidate("k")
                with pytest.raises(StoreError):
                    await pf.cancel("k")
        finally:
            server.resume()
