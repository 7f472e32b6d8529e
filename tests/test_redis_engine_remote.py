"""The engine's shared-store paths: a failure stays visible to the instance that ran it,
a run joined in another process counts as a join, and refresh_after reloads an old
stored value in the background."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from prefetch_ingest import Prefetcher, Status
from prefetch_ingest.redis import RedisStore

from .redis_server import RedisServer, redis_server_fixture
from .test_redis_store import until

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_server = redis_server_fixture()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


async def test_a_failure_with_failure_ttl_zero_is_reported_and_retried(
    redis_server: RedisServer,
) -> None:
    calls = 0

    async def flaky(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("LLM quota")
        return "stats"

    async with Prefetcher(flaky, store=RedisStore(redis_server.url)) as pf:
        with pytest.raises(RuntimeError, match="LLM quota"):
            await pf.get("run")
        snap = await pf.status("run")
        assert snap.status is Status.FAILED
        assert snap.error == "RuntimeError: LLM quota"
        assert await pf.get("run") == "stats"  # failure_ttl=0: the next get retries
        assert (await pf.status("run")).status is Status.COMPLETED
    assert calls == 2


async def test_a_failure_within_failure_ttl_is_reraised_locally(redis_server: RedisServer) -> None:
    calls = 0

    async def failing(key: str) -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("down")

    async with Prefetcher(failing, failure_ttl=60, store=RedisStore(redis_server.url)) as pf:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="down"):
                await pf.get("k")
    assert calls == 1


async def test_a_run_finished_by_another_instance_counts_as_a_join(
    redis_server: RedisServer,
) -> None:
    gate = anyio.Event()
    started = anyio.Event()

    async def slow(key: str) -> str:
        started.set()
        await gate.wait()
        return "from a"

    async def never(key: str) -> str:
        raise AssertionError("b must not run the key")

    async with (
        Prefetcher(slow, store=RedisStore(redis_server.url)) as a,
        Prefetcher(never, store=RedisStore(redis_server.url)) as b,
    ):
        a.prefetch("k")
        await started.wait()
        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def from_b() -> None:
                results.append(await b.get("k"))

            tg.start_soon(from_b)

            async def b_in_flight() -> bool:
                # b's get has looked the key up (a round trip: no task-blocked check tells
                # it apart from waiting on a's run) and started its flight, which follows
                # a's run or, if that ended first, takes its stored value: a join either way
                return bool(b.in_flight())

            await until(b_in_flight)
            gate.set()
        assert results == ["from a"]
        stats = b.stats()
        assert (stats.misses, stats.joins, stats.load_successes) == (0, 1, 0)


async def test_refresh_after_reloads_an_old_stored_value_in_the_background(
    redis_server: RedisServer,
) -> None:
    versions = iter(["v1", "v2"])
    reloaded = anyio.Event()

    async def load(key: str) -> str:
        value = next(versions)
        if value == "v2":
            reloaded.set()
        return value

    async with Prefetcher(
        load, ttl=3600, refresh_after=0.05, store=RedisStore(redis_server.url)
    ) as pf:
        assert await pf.get("k") == "v1"
        with anyio.fail_after(10):
            while not reloaded.is_set():
                # served at once from Redis while it is fresh; once older than
                # refresh_after, still served, and a background reload starts
                assert await pf.get("k") == "v1"
                await anyio.sleep(0.02)
            await pf.wait("k")
        assert await pf.get("k") == "v2"
        assert pf.stats().prefetches == 1
