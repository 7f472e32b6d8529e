"""Library bugs found while porting the v1 Redis tests to the v2 store layer.

Each test is minimal, and failed on the library as the port found it. All were fixed
meanwhile (48fdda8, d3ea339, 2133b35; the attack tests found most of them too) and stay
as regression tests: a corrupt outcome of kind 'c', a corrupt outcome hiding the lease,
the lease of a load cancelled while its acquire was on the way, a local failure the store
no longer has, the forced follower of a failed refresh.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, RemoteLoadError, Status
from prefetch_ingest.redis import RedisStore
from prefetch_ingest.stores.memory import MemoryServer, MemoryStore
from tests.helpers import FakeClock
from tests.redis_server import RedisServer, redis_server_fixture

pytestmark = pytest.mark.anyio

redis_server = redis_server_fixture()

_TIMES = struct.pack(">ddd?", 1.0, 2.0, math.nan, False)

on_redis = [pytest.mark.redis, pytest.mark.parametrize("anyio_backend", ["asyncio"])]
"""RedisStore is asyncio only."""


class Boom(Exception):
    pass


async def one() -> Any:
    return 1


def outcome_name(store: RedisStore, key: Any) -> str:
    return store._redis.names(store._digest(key))[0]


@on_redis[0]
@on_redis[1]
async def test_a_corrupt_outcome_of_kind_c_is_loaded_again_not_waited_on_forever(
    redis_server: RedisServer,
) -> None:
    """Bytes that start like a completed value (b"Pc") but do not parse (here: a fence that
    is not digits). The acquire script sees kind 'c' and refuses the lease ("there is a value
    to use"); RedisBackend._parse drops the record as corrupt; LeasedStore.load saw neither
    an outcome nor a run and waited, forever (a corrupt-entry warning every poll), so a
    ``get`` of the key never returned. v1 reported it and loaded the key again."""
    store = RedisStore(redis_server.url, poll_interval=0.05)
    await store.open(ttl=None, failure_ttl=0.0)
    try:
        bad = b"Pc" + b"0123456789abcdef" + b"x" * 16 + _TIMES + b"1"
        redis_server.command("SET", outcome_name(store, "k"), bad)
        with capture_logs(), anyio.fail_after(5):
            outcome = await store.load("k", one, background=False, force=False)
        assert outcome.ran_here and outcome.value == 1
    finally:
        await store.aclose()


@on_redis[0]
@on_redis[1]
async def test_a_corrupt_outcome_does_not_hide_the_live_lease_read_with_it(
    redis_server: RedisServer,
) -> None:
    """RedisBackend._parse parsed outcome, lease and note in one try: a corrupt outcome
    (here a failure with no NUL between type and message) discarded the well-formed lease
    read with it, so while another instance ran the key a lookup said nothing was stored
    (None: not started) instead of RUNNING, and a follower never learnt the run's token."""
    owner = RedisStore(redis_server.url)
    other = RedisStore(redis_server.url)
    await owner.open(ttl=None, failure_ttl=0.0)
    await other.open(ttl=None, failure_ttl=0.0)
    started = anyio.Event()
    release = anyio.Event()

    async def run() -> Any:
        started.set()
        await release.wait()
        return 2

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(owner.load, "k", run, background=False, force=False))
            await started.wait()
            bad = b"Pf" + b"0123456789abcdef" + b"1" * 16 + _TIMES + b"no separator"
            redis_server.command("SET", outcome_name(owner, "k"), bad)
            try:
                with capture_logs():
                    entry = await other.lookup("k")
                assert entry is not None and entry.status is Status.RUNNING
            finally:
                release.set()
    finally:
        await owner.aclose()
        await other.aclose()


@on_redis[0]
@on_redis[1]
async def test_a_load_cancelled_after_its_acquire_landed_hands_the_lease_back(
    redis_server: RedisServer,
) -> None:
    """The acquire script has taken the lease in Redis, but the load is cancelled before
    its reply arrives: LeasedStore.load knew the token it asked for (``me.token``) yet
    released nothing, so the key stayed leased to no one for the whole lease (30 s here)
    and every other instance waited that long. v1 handed the lease back at once."""
    store = RedisStore(redis_server.url, lease=30.0)
    await store.open(ttl=None, failure_ttl=0.0)
    landed = anyio.Event()
    acquire = store._scripts["acquire"]

    async def acquire_then_stall(**kwargs: Any) -> Any:
        await acquire(**kwargs)
        landed.set()
        await anyio.sleep_forever()

    store._scripts["acquire"] = acquire_then_stall
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(store.load, "k", one, background=False, force=False))
            await landed.wait()
            tg.cancel_scope.cancel()
        lease = store._redis.names(store._digest("k"))[1]
        assert redis_server.command("EXISTS", lease) == 0
    finally:
        store._scripts["acquire"] = acquire
        await store.aclose()


async def test_status_drops_a_local_failure_the_store_no_longer_has_past_failure_ttl() -> None:
    """v2 keeps every failure in the store for ``ttl``: a local failure record that the
    store no longer has was invalidated elsewhere. Prefetcher.status reasoned as in v1
    ("the store keeps a failure for failure_ttl") and dropped it only within failure_ttl:
    past it, status said FAILED while ``get`` (which asks the store) ran the key again."""
    server = MemoryServer()
    clock = FakeClock()

    async def fail(key: str) -> str:
        raise Boom("first")

    options: dict[str, Any] = {"ttl": 100.0, "failure_ttl": 1.0, "clock": clock}
    async with (
        Prefetcher(fail, store=MemoryStore(server), **options) as a,
        Prefetcher(fail, store=MemoryStore(server), **options) as b,
    ):
        with capture_logs(), pytest.raises(Boom):
            await a.get("k")
        clock.advance(2.0)  # past failure_ttl, well within ttl
        assert await b.invalidate("k")
        assert (await a.status("k")).status is Status.NOT_STARTED


async def test_a_forced_follower_of_a_failed_refresh_gets_the_failure_not_a_second_run() -> None:
    """Instance B force-refreshes a key while A's forced refresh runs: B follows A's run.
    A's run fails; its failure is not written over the completed value (right), so B's next
    acquire found no outcome of the run it followed, took the lease and ran the key again:
    two executions where one was asked for, and the failure was not reported on B (v1 left
    a failure notice for the followers). With N forcing followers, N runs one after another.
    (Fixed: the failed refresh leaves a failure note.)"""
    server = MemoryServer()
    calls: list[int] = []
    started = anyio.Event()
    release = anyio.Event()

    async def load(key: str) -> str:
        calls.append(1)
        if len(calls) == 2:  # the refresh
            started.set()
            await release.wait()
            raise Boom("refresh")
        return f"v{len(calls)}"

    got: list[Any] = []
    follower = MemoryStore(server, poll_interval=0.05)
    async with (
        Prefetcher(load, store=MemoryStore(server)) as a,
        Prefetcher(load, store=follower) as b,
    ):
        assert await a.get("k") == "v1"

        async def in_a() -> None:
            with pytest.raises(Boom):
                await a.get("k", force_refresh=True)

        async def in_b() -> None:
            try:
                got.append(await b.get("k", force_refresh=True))
            except RemoteLoadError as exc:
                got.append(exc)

        with capture_logs():
            async with anyio.create_task_group() as tg:
                tg.start_soon(in_a)
                await started.wait()
                tg.start_soon(in_b)
                await anyio.wait_all_tasks_blocked()  # B follows A's run
                release.set()
    assert len(calls) == 2, got
    assert len(got) == 1 and isinstance(got[0], RemoteLoadError), got
