"""Faults on the Redis side: paused owners, a blocked or restarted server, cancellation at the
edges of the lease, an evicting memory policy."""

from __future__ import annotations

import functools
import signal
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import Status
from prefetch_ingest.redis import RedisStore, current_fence

from .redis_server import RedisServer, redis_server_fixture
from .test_redis_engine import counter, reap, report, spawn
from .test_redis_store import lease_key, listening, opened, until, value_of

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

redis_server = redis_server_fixture()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


async def test_an_evicting_memory_policy_is_warned_about(redis_server: RedisServer) -> None:
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    with capture_logs() as logs:
        async with opened(RedisStore(redis_server.url)):
            pass
    (event,) = logs
    assert event["event"] == "prefetch.redis_eviction_policy"
    assert event["policy"] == "allkeys-lru"
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    with capture_logs() as logs:
        async with opened(RedisStore(redis_server.url)):
            pass
    assert logs == []


async def test_server_blocked_longer_than_the_lease(redis_server: RedisServer) -> None:
    """DEBUG SLEEP past the lease: renewal fails, the owner learns it lost the lease and does
    not store; the waiting instance takes over and its result stands."""
    started = anyio.Event()
    finish = anyio.Event()

    async def owner_load() -> Any:
        started.set()
        await finish.wait()
        return "old owner"

    a = RedisStore(redis_server.url, lease=0.6)
    b = RedisStore(redis_server.url, lease=5.0, poll_interval=0.05)
    outcomes: dict[str, Any] = {}
    with capture_logs() as logs:
        async with opened(a), opened(b), anyio.create_task_group() as tg:

            async def in_a() -> None:
                outcomes["a"] = await a.load("k", owner_load, background=False, force=False)

            async def in_b() -> None:
                outcomes["b"] = await b.load(
                    "k", value_of("new owner"), background=False, force=False
                )

            tg.start_soon(in_a)
            await started.wait()
            tg.start_soon(in_b)
            await until(lambda: listening(b))
            # the server stops answering for longer than the lease
            await anyio.to_thread.run_sync(redis_server.command, "DEBUG", "SLEEP", "1.5")

            async def b_done() -> bool:
                return "b" in outcomes

            await until(b_done)

            async def a_knows() -> bool:
                return any(
                    e["event"] == "prefetch.store_lease_lost" and e["when"] == "renewal"
                    for e in logs
                )

            await until(a_knows)
            finish.set()
        entry = await _lookup(redis_server, "k")
    assert outcomes["b"].ran_here and outcomes["b"].value == "new owner"
    assert outcomes["a"].value == "old owner"  # its own caller still gets its value
    assert entry == "new owner"  # ... but it was never stored over the newer one


async def _lookup(server: RedisServer, key: Any) -> Any:
    async with opened(RedisStore(server.url)) as store:
        entry = await store.lookup(key)
    return None if entry is None else entry.value


async def test_restart_without_persistence_fences_the_old_owner(
    redis_server: RedisServer,
) -> None:
    """Redis loses everything while an owner runs: a new owner takes a fresh lease under a
    greater fence (the epoch is the server's clock, which the restart did not reset) and
    completes; the old owner's token is no longer in the lease, so its write is refused, and
    one final value stands."""
    started = anyio.Event()
    finish = anyio.Event()
    fences: dict[str, int | None] = {}

    async def old_load() -> Any:
        fences["old"] = current_fence()
        started.set()
        await finish.wait()
        return "old"

    async def new_load() -> Any:
        fences["new"] = current_fence()
        return "new"

    a = RedisStore(redis_server.url, lease=30.0)
    b = RedisStore(redis_server.url, lease=30.0)
    result: list[Any] = []
    with capture_logs() as logs:
        async with opened(a), opened(b), anyio.create_task_group() as tg:

            async def in_a() -> None:
                result.append(await a.load("k", old_load, background=False, force=False))

            tg.start_soon(in_a)
            await started.wait()
            redis_server.kill()
            redis_server.start()  # same port, empty
            outcome = await b.load("k", new_load, background=False, force=False)
            assert outcome.ran_here
            finish.set()
        assert await _lookup(redis_server, "k") == "new"
    old_fence, new_fence = fences["old"], fences["new"]
    assert old_fence is not None and new_fence is not None and new_fence > old_fence
    assert result[0].value == "old"
    assert any(e["event"] == "prefetch.store_lease_lost" for e in logs)


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 3, 5, 8, 13, 21])
async def test_cancellation_at_any_point_never_leaves_a_lease_without_expiry(
    redis_server: RedisServer, delay_ms: int
) -> None:
    """Cancel a load after a few ms (during acquire, run, completion or release): any lease left
    has an expiry, and status agrees with what Redis holds."""
    name = lease_key("prefetch_ingest", "k")

    async def quick_load() -> Any:
        await anyio.sleep(0.002)
        return "v"

    async with opened(RedisStore(redis_server.url, lease=30.0)) as store:
        for _ in range(5):
            with anyio.move_on_after(delay_ms / 1000):
                await store.load("k", quick_load, background=False, force=False)
            pttl = int(redis_server.command("PTTL", name))
            assert pttl == -2 or pttl > 0  # absent, or expiring
            entry = await store.lookup("k")
            if pttl > 0:
                assert entry is not None and entry.status in (Status.RUNNING, Status.COMPLETED)
            await store.invalidate("k")
            redis_server.command("DEL", name)


async def test_cancelled_right_after_the_acquire_landed_the_lease_is_handed_back(
    redis_server: RedisServer,
) -> None:
    """The acquire script ran in Redis (the lease is taken) but its reply has not reached
    the caller when the load is cancelled: the lease is released at once (not left to
    expire), and status agrees with Redis."""
    landed = anyio.Event()
    ran: list[str] = []

    async def load() -> Any:
        ran.append("k")
        return "v"

    async with opened(RedisStore(redis_server.url, lease=30.0)) as store:
        acquire = store._scripts["acquire"]

        async def acquire_then_stall(**kwargs: Any) -> Any:
            await acquire(**kwargs)  # the SET NX has landed ...
            landed.set()
            await anyio.sleep_forever()  # ... and the reply never arrives

        store._scripts["acquire"] = acquire_then_stall
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(store.load, "k", load, background=False, force=False))
            await landed.wait()
            assert int(redis_server.command("PTTL", lease_key("prefetch_ingest", "k"))) > 0
            tg.cancel_scope.cancel()
        store._scripts["acquire"] = acquire
        assert redis_server.command("EXISTS", lease_key("prefetch_ingest", "k")) == 0
        assert await store.lookup("k") is None
    assert ran == []


async def test_cancelled_while_releasing_the_release_still_completes(
    redis_server: RedisServer,
) -> None:
    """A running load is cancelled and its release is held up on the way to Redis: the
    cancellation does not cut the release short (it is shielded), so once it goes through the
    lease is gone and status agrees with Redis; until then the lease still has its expiry."""
    started = anyio.Event()
    releasing = anyio.Event()
    proceed = anyio.Event()

    async def load() -> Any:
        started.set()
        await anyio.sleep_forever()

    async with opened(RedisStore(redis_server.url, lease=30.0)) as store:
        release = store._scripts["release"]

        async def held_release(**kwargs: Any) -> Any:
            releasing.set()
            await proceed.wait()
            return await release(**kwargs)

        store._scripts["release"] = held_release
        ended = anyio.Event()

        async def run() -> None:
            try:
                await store.load("k", load, background=False, force=False)
            finally:
                ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await releasing.wait()
                assert not ended.is_set()  # the cancelled load waits for its release
                pttl = int(redis_server.command("PTTL", lease_key("prefetch_ingest", "k")))
                assert 0 < pttl <= 30_000
                entry = await store.lookup("k")
                assert entry is not None and entry.status is Status.RUNNING
                proceed.set()
                await ended.wait()
        store._scripts["release"] = release
        assert redis_server.command("EXISTS", lease_key("prefetch_ingest", "k")) == 0
        assert await store.lookup("k") is None


@pytest.mark.slow
async def test_owner_process_paused_past_its_lease(redis_server: RedisServer) -> None:
    """SIGSTOP the owning process past its lease: another process takes over and completes;
    after SIGCONT the old owner's write is rejected by fencing, and it logs so."""
    lease = ("--lease", "0.6", "--callers", "3")
    owner = spawn(redis_server, "k", "stale-first", *lease)
    processes = [owner]
    try:

        async def owner_running() -> bool:
            return await counter(redis_server, "k:executions") == 1

        await until(owner_running)
        owner.send_signal(signal.SIGSTOP)

        async def lease_lapsed() -> bool:
            return not redis_server.command("EXISTS", lease_key("mp", "k"))

        await until(lease_lapsed)
        second = spawn(redis_server, "k", "stale-first", *lease)
        processes.append(second)
        second_report = await report(second)
        assert second_report["results"] == ["value"] * 3
        redis_server.command("SET", "k:go", "1")
        owner.send_signal(signal.SIGCONT)
        out, err = await anyio.to_thread.run_sync(functools.partial(owner.communicate, timeout=60))
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        reap(processes)
    assert owner.returncode == 0, err
    assert '"results": ["stale", "stale", "stale"]' in out
    assert "prefetch.store_lease_lost" in out + err
    async with opened(RedisStore(redis_server.url, prefix="mp")) as store:
        entry = await store.lookup("k")
    assert entry is not None and entry.value == "value"
    assert await counter(redis_server, "k:executions") == 2


@pytest.mark.slow
async def test_two_instances_starting_at_once_after_a_crash_rerun_it_once(
    redis_server: RedisServer,
) -> None:
    """The owner is SIGKILLed mid-load and its lease lapses; two fresh processes then get the
    key at the same time: exactly one of them runs it again, both get its value."""
    owner = spawn(redis_server, "k", "hang-first", "--callers", "3", "--lease", "0.5")
    processes = [owner]
    try:

        async def owner_in() -> bool:
            return (
                await counter(redis_server, "k:executions") == 1
                and await counter(redis_server, "k:ready") == 1
            )

        await until(owner_in)
        assert redis_server.command("EXISTS", lease_key("mp", "k")) == 1  # it is running
        owner.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(owner.wait)

        async def lease_lapsed() -> bool:
            return not redis_server.command("EXISTS", lease_key("mp", "k"))

        await until(lease_lapsed)
        # the application side restarts: two fresh instances, both demanding the key
        fresh = [spawn(redis_server, "k", "gate", "--callers", "20") for _ in range(2)]
        processes += fresh

        async def both_in() -> bool:
            return await counter(redis_server, "k:ready") == 3

        await until(both_in, timeout=60)
        # both are blocked on the key, and it is running once
        assert await counter(redis_server, "k:executions") == 2
        redis_server.command("SET", "k:go", "1")
        reports = [await report(p) for p in fresh]
    finally:
        reap(processes)
    assert [r["results"] for r in reports] == [["value"] * 20] * 2
    assert sum(r["successes"] for r in reports) == 1
    assert await counter(redis_server, "k:executions") == 2
    assert redis_server.command("KEYS", "mp:*:l") == []
    async with opened(RedisStore(redis_server.url, prefix="mp")) as store:
        entry = await store.lookup("k")
    assert entry is not None and entry.status is Status.COMPLETED and entry.value == "value"
