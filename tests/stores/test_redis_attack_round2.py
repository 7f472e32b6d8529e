"""Attack round 2 on a real Redis: shared-store findings (from tests/engine/test_attack_round2.py).

Three of these failed on the v1 store (invalidate did not detach a run, wait() did not
wait across instances, a huge int key raised ValueError); four asserted v1 behaviour
that the v2 contract changes (cancel ends the run in every instance, invalidate detaches
it everywhere, a value completed during an outage reaches its waiters, a failure is
reported on every instance) and now assert v2.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import CodecError, LoadCancelled, Prefetcher, Status
from tests.redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.anyio

redis_server = redis_server_fixture()

# the helpers of the attack file these tests came from, not copies of them
from tests.engine.test_attack_round2 import (  # noqa: E402
    HUGE_INT,
    _Counter,
    _store,
    _value,
    asyncio_only,
)


@pytest.mark.redis
async def test_redis_invalidate_while_running_is_not_stored_and_the_next_get_runs_afresh(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter({"n": 1})
    results: list[Any] = []
    async with Prefetcher(load, store=_store(redis_server)) as pf:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    results.append(await pf.get("k"))

                tg.start_soon(waiter)
                await load.started.wait()
                await pf.invalidate("k")
                assert (await pf.status("k")).status is not Status.COMPLETED
                load.gate.set()
            assert results == [{"n": 1}]  # its waiters get its result
            load.value = {"n": 2}
            assert await pf.get("k") == {"n": 2}  # ... but it was not stored
        assert load.calls == 2


@pytest.mark.redis
async def test_redis_wait_in_another_instance_returns_once_the_key_is_done(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter(7)
    snaps: list[Any] = []
    async with (
        Prefetcher(load, store=_store(redis_server)) as a,
        Prefetcher(load, store=_store(redis_server)) as b,
    ):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.get, "k")
                await load.started.wait()
                assert (await b.status("k")).status is Status.RUNNING

                async def waiter() -> None:
                    snaps.append(await b.wait("k"))

                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                load.gate.set()
        assert snaps[0].status is Status.COMPLETED and snaps[0].result == 7
        assert load.calls == 1


@pytest.mark.redis
async def test_redis_a_huge_int_key_is_accepted_or_a_type_error_naming_key(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    """redis.md: keys of any size are hashed (an int past Python's 4300-digit str() limit
    too); the value JSON cannot hold (that int) is a CodecError of that load only."""
    asyncio_only(anyio_backend)

    async def ok(key: Any) -> str:
        return "ok"

    async with Prefetcher(ok, store=_store(redis_server)) as pf:
        assert await pf.get(HUGE_INT) == "ok"
        assert await pf.get(HUGE_INT + 1) == "ok"
        assert (await pf.status(HUGE_INT)).status is Status.COMPLETED
        with pytest.raises(CodecError):
            await pf.get(("v", HUGE_INT + 2), _value, HUGE_INT)


@pytest.mark.redis
async def test_redis_cancel_in_a_joining_instance_cancels_the_run_everywhere(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    """cancel on B, which follows A's run: the run ends (A's callers too get LoadCancelled),
    nothing is stored, and the next get runs the key again."""
    asyncio_only(anyio_backend)
    load = _Counter("done")
    b_out: list[Any] = []
    a_out: list[Any] = []
    async with (
        Prefetcher(load, store=_store(redis_server)) as a,
        Prefetcher(load, store=_store(redis_server)) as b,
    ):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def in_a() -> None:
                    try:
                        a_out.append(await a.get("k"))
                    except LoadCancelled as exc:
                        a_out.append(exc)

                async def in_b() -> None:
                    try:
                        b_out.append(await b.get("k"))
                    except LoadCancelled as exc:
                        b_out.append(exc)

                tg.start_soon(in_a)
                await load.started.wait()
                tg.start_soon(in_b)
                while not b.in_flight():
                    await anyio.wait_all_tasks_blocked()
                    await anyio.lowlevel.checkpoint()
                assert await b.cancel("k") is True
            assert len(b_out) == 1 and isinstance(b_out[0], LoadCancelled)
            assert len(a_out) == 1 and isinstance(a_out[0], LoadCancelled)
            assert (await a.status("k")).status is Status.NOT_STARTED
            load.gate.set()
            assert await b.get("k") == "done"
        assert load.calls == 2


@pytest.mark.redis
async def test_redis_invalidate_from_another_instance_while_running_then_completion(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    """Another instance's invalidate during a run detaches it: the run's own callers get
    its value, it is not stored, and a get after the invalidate runs afresh."""
    asyncio_only(anyio_backend)
    load = _Counter("v")
    a_out: list[Any] = []
    async with (
        Prefetcher(load, store=_store(redis_server)) as a,
        Prefetcher(load, store=_store(redis_server)) as b,
    ):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def in_a() -> None:
                    a_out.append(await a.get("k"))

                tg.start_soon(in_a)
                await load.started.wait()
                await b.invalidate("k")
                load.value = "fresh"
                load.started = anyio.Event()
                tg.start_soon(b.get, "k")
                await load.started.wait()  # b ran it afresh, not followed a's old run
                assert load.calls == 2
                load.gate.set()
            assert a_out == ["fresh"]  # the gate is shared: a's run returned then too
            assert await b.get("k") == "fresh"
            assert await a.get("k") == "fresh"
        assert load.calls == 2


@pytest.mark.redis
async def test_redis_server_killed_mid_load_every_waiter_ends_and_it_recovers(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)
    load = _Counter("v")
    out: list[Any] = []
    with capture_logs():
        async with Prefetcher(load, store=_store(redis_server, lease=1.0)) as pf:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:

                    async def waiter() -> None:
                        try:
                            out.append(await pf.get("k"))
                        except BaseException as exc:
                            out.append(exc)

                    tg.start_soon(waiter)
                    tg.start_soon(waiter)
                    await load.started.wait()
                    redis_server.kill()
                    load.gate.set()
                # the work is never thrown away: the value reaches its local waiters
                assert out == ["v", "v"], out
                redis_server.start()
                load.value = "after"
                assert await pf.get("k2") == "after"
                # the write could not land (Redis lost everything): nothing stale, no failure
                assert (await pf.status("k")).status is Status.NOT_STARTED


@pytest.mark.redis
async def test_redis_values_the_codec_cannot_encode_fail_with_codec_error_and_status_says_so(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    asyncio_only(anyio_backend)

    async def a_set(key: Any) -> Any:
        return {1, 2}

    async def deep(key: Any) -> Any:
        v: Any = []
        for _ in range(100_000):
            v = [v]
        return v

    async with (
        Prefetcher(store=_store(redis_server)) as a,
        Prefetcher(store=_store(redis_server)) as b,
    ):
        for key, fn in (("set", a_set), ("deep", deep)):
            with anyio.fail_after(10):
                with pytest.raises(CodecError):
                    await a.get(key, fn, key)
            snap = await a.status(key)
            assert snap.status is Status.FAILED
            assert snap.error is not None and snap.error.startswith("CodecError")
            # reported on every instance alike (failure_ttl only decides what get does)
            assert (await b.status(key)).status is Status.FAILED
