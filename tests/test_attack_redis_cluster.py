"""Adversarial tests of the Redis Cluster and Sentinel support (URLs, clients, WAIT, notices).

Each ``xfail(strict=True)`` test asserts the right behaviour and fails today; the
unmarked ones are regression tests of behaviour that is already right.
"""

from __future__ import annotations

import asyncio
import gc
import math
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.cluster import LoadBalancingStrategy
from structlog.testing import capture_logs

from prefetch_ingest import (
    LoadCancelled,
    Prefetcher,
    StoreError,
    WrongThreadError,
    report_progress,
)
from prefetch_ingest.redis import RedisStore
from prefetch_ingest.stores.interface import Outcome, Run

from .redis_cluster import Cluster, SentinelSet, cluster_fixture, sentinel_fixture
from .redis_server import RedisServer, redis_server_fixture
from .test_redis_store import lease_key

pytestmark = pytest.mark.anyio

SECRET = "hunter2-s3cret"

attack_cluster = cluster_fixture(name="attack_cluster", scope="module")
attack_sentinel = sentinel_fixture(name="attack_sentinel")
attack_server = redis_server_fixture(name="attack_server")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


@pytest.fixture
def cluster(attack_cluster: Cluster) -> Iterator[Cluster]:
    attack_cluster.flushall()
    for node in attack_cluster.masters():
        node.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    yield attack_cluster
    attack_cluster.check_no_lease_without_expiry()


# -- URLs: construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://:7000",
        "redis+cluster://,",
        "redis+cluster://h:0",
        "redis+cluster://h:65536",
        "redis+cluster://h:port",
        "redis+cluster://[::1",  # unclosed IPv6 bracket
        "redis+cluster://h:1/0",  # a cluster has database 0 only
        "redis+cluster://h:1?db=0",
        "redis+cluster://h:1?password=x",  # not an option: the user part is
        "redis+cluster://h:1?socket_timeout=nan",
        "redis+cluster://h:1?socket_timeout=0",
        "redis+cluster://h:1?max_connections=0",
        "redis+cluster://h:1?max_connections=-3",
        "redis+cluster://h:1?sentinel_password=x",  # a Sentinel option on a cluster
        "rediss+cluster://h:1",  # no TLS scheme for a host list
        "redis+sentinel://h:1",  # no service name
        "redis+sentinel://h:1/",
        "redis+sentinel://h:1/m/x",
        "redis+sentinel://h:1/m/0/extra",
    ],
)
def test_bad_url_is_a_value_error_without_the_secret(url: str) -> None:
    with_secret = url.replace("://", f"://user:{SECRET}@", 1)
    with pytest.raises(ValueError) as caught:
        RedisStore(with_secret)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis+sentinel://h:1/mymaster/-1", "database"),
        ("redis+sentinel://h:1/mymaster/99999999999999999999", "database"),
        ("redis+cluster://::1", "host"),
        ("redis+cluster://h:7_000", "port"),
        ("redis+cluster://h: 7000", "port"),
        ("redis+cluster://h:1?max_connections=²", "max_connections"),
    ],
)
def test_bad_url_accepted_or_unclear(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisStore(url)


@pytest.mark.parametrize(
    "url",
    [
        f"redis+cluster://u:{SECRET}/x@h:1",
        f"redis+cluster://u:{SECRET}#x@h:1",
        f"redis+sentinel://u:{SECRET}?x@h:1/m",
        f"redis+cluster://h:1?passwd={SECRET}",
        f"redis://u:{SECRET}/x@h:1/0",  # redis-py would print it as a port, at open
        f"rediss+cluster://u:{SECRET}/x@h:1",  # the scheme's error too
    ],
)
def test_a_secret_is_never_in_a_url_error(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        RedisStore(url)
    assert SECRET not in str(caught.value)


def test_an_at_sign_in_an_option_value_is_accepted_and_hidden() -> None:
    store = RedisStore(f"redis+sentinel://h:1/m?sentinel_password={SECRET}@x")
    assert store._redis.where.startswith("redis+sentinel://")
    assert SECRET not in repr(store)


def test_repr_hides_master_and_sentinel_passwords() -> None:
    url = (
        f"redis+sentinel://admin:{SECRET}@[::1]:26379,s2/mymaster/3"
        f"?sentinel_password={SECRET}&sentinel_username=sv"
    )
    store = RedisStore(url, replicas=1)
    shown = repr(store)
    assert SECRET not in shown
    assert shown.startswith("RedisStore('redis+sentinel://admin:***@[::1]:26379,s2/mymaster/3")
    assert "replicas=1" in shown


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"replicas": -1}, ValueError),
        ({"replicas": True}, ValueError),
        ({"replicas": 1.0}, ValueError),
        ({"replica_timeout": math.nan}, ValueError),
        ({"replica_timeout": math.inf}, ValueError),
        ({"replica_timeout": 0}, ValueError),  # WAIT 0 would block for ever
        ({"replica_timeout": -1.0}, ValueError),
        ({"replica_timeout": True}, TypeError),
    ],
)
def test_bad_replicas_options_are_refused(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="replica"):
        RedisStore("redis+cluster://h:1", **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"replicas": 2**63}, {"replicas": 2**31}, {"replica_timeout": 1e17}]
)
def test_replicas_options_beyond_what_wait_takes_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="replica"):
        RedisStore("redis+cluster://h:1", **{"replicas": 1, **kwargs})


# -- the wrong kind of server ------------------------------------------------------------------


@pytest.mark.redis
async def test_a_cluster_url_to_a_plain_server_is_refused_clearly(
    attack_server: RedisServer,
) -> None:
    url = f"redis+cluster://127.0.0.1:{attack_server.port}"
    with pytest.raises(ValueError, match=r"redis://"):
        async with Prefetcher(store=RedisStore(url, fallback="local")):
            pass


@pytest.mark.redis
async def test_a_plain_url_to_a_sentinel_is_refused_at_open(
    attack_sentinel: SentinelSet,
) -> None:
    url = f"redis://127.0.0.1:{attack_sentinel.sentinels[0].port}/0"
    with pytest.raises(ValueError, match=r"redis\+sentinel://"):
        async with Prefetcher(store=RedisStore(url, lease=1.0)):
            pass


@pytest.mark.redis
async def test_a_plain_client_to_a_cluster_node_is_refused_and_left_usable(
    cluster: Cluster,
) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        with pytest.raises(ValueError, match=r"redis\+cluster://"):
            async with Prefetcher(store=RedisStore(client)):
                pass
        assert await client.ping()
    finally:
        await client.aclose()


# -- a real cluster ------------------------------------------------------------------------------


@pytest.mark.redis
async def test_an_evicting_policy_on_any_cluster_master_is_reported(cluster: Cluster) -> None:
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[0].port)])
    try:
        await client.initialize()
        default = client.get_default_node()
        others = [n for n in cluster.masters() if n.port != int(default.port)]
        assert others
        for node in others:
            node.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        with capture_logs() as logs:
            async with Prefetcher(store=RedisStore(client)):
                pass
        warned = [e for e in logs if e["event"] == "prefetch.redis_eviction_policy"]
        assert sorted(int(e["node"].rpartition(":")[2]) for e in warned) == sorted(
            n.port for n in others
        )  # one warning per evicting master, naming it
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_brace_keys_run_once_across_two_instances_on_a_cluster(cluster: Cluster) -> None:
    """Keys full of hash-tag characters: no CROSSSLOT, no collision, one run per key."""
    keys: list[Any] = ["{a}", "}{", ("{p}", "{r}"), "a{b}c", "{", "}", "{}"]
    calls: dict[str, int] = {}
    all_started = anyio.Event()
    gate = anyio.Event()

    async def load(key: Any) -> str:
        calls[repr(key)] = calls.get(repr(key), 0) + 1
        if sum(calls.values()) >= len(keys):
            all_started.set()
        await gate.wait()
        return f"v{key!r}"

    got: dict[str, list[str]] = {}
    async with (
        Prefetcher(load, store=RedisStore(cluster.url, lease=2.0)) as p1,
        Prefetcher(load, store=RedisStore(cluster.url, lease=2.0)) as p2,
    ):

        async def one(pf: Prefetcher[Any, str], key: Any) -> None:
            got.setdefault(repr(key), []).append(await pf.get(key))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for key in keys:
                    for pf in (p1, p2, p1, p2):
                        tg.start_soon(one, pf, key)
                await all_started.wait()
                gate.set()
    assert calls == {repr(k): 1 for k in keys}
    assert got == {repr(k): [f"v{k!r}"] * 4 for k in keys}


def _collect_leaked_clients() -> None:
    """Collect, here and now (the loop still running), a client the store leaked: its
    'Unclosed Redis client' ResourceWarning must not land in a later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def _until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll this process's own state (bounded): the store has no event for it."""
    with anyio.fail_after(timeout):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


def _kill_pubsub_connections(cluster: Cluster) -> int:
    killed = 0
    for node in cluster.live():
        killed += int(node.command("CLIENT", "KILL", "TYPE", "pubsub"))
    return killed


@pytest.mark.redis
async def test_a_follower_wakes_after_its_notification_connection_is_killed(
    cluster: Cluster,
) -> None:
    """The reader's pub/sub connection dies while a follower waits; the completion's
    notification may be lost: the follower still gets the value (resubscription / poll)."""
    started = anyio.Event()
    release = anyio.Event()
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return f"v-{key}"

    follower_store = RedisStore(cluster.url, lease=2.0)
    async with (
        Prefetcher(load, store=RedisStore(cluster.url, lease=2.0)) as owner,
        Prefetcher(load, store=follower_store) as follower,
        anyio.create_task_group() as tg,
    ):
        results: list[str] = []
        served = anyio.Event()
        signals = follower_store._redis._signals

        async def follow() -> None:
            results.append(await follower.get("k"))
            served.set()

        tg.start_soon(owner.get, "k")
        with anyio.fail_after(15):
            await started.wait()
            tg.start_soon(follow)
            await _until(lambda: signals.waiters() > 0)  # it waits
            assert _kill_pubsub_connections(cluster) >= 2  # both instances' readers
            release.set()
            await served.wait()
    assert results == ["v-k"] and calls == 1


@pytest.mark.redis
async def test_more_replicas_than_exist_delay_only_the_owner(cluster: Cluster) -> None:
    """replicas=1 on a cluster without replicas: the owner's WAIT runs out (and is logged);
    another instance's follower is served by the notification before that, not after."""
    started = anyio.Event()
    order: list[str] = []
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        return f"v-{key}"

    # replica_timeout below lease / 3 (see the next test for the other case)
    owner_store = RedisStore(cluster.url, lease=9.0, replicas=1, replica_timeout=2.5)
    with capture_logs() as logs, anyio.fail_after(20):
        async with (
            Prefetcher(load, store=owner_store) as owner,
            Prefetcher(load, store=RedisStore(cluster.url, lease=9.0)) as follower,
            anyio.create_task_group() as tg,
        ):

            async def own() -> None:
                assert await owner.get("k") == "v-k"
                order.append("owner")

            async def follow() -> None:
                await started.wait()
                assert await follower.get("k") == "v-k"
                order.append("follower")

            tg.start_soon(own)
            tg.start_soon(follow)
    assert order == ["follower", "owner"] and calls == 1
    (short,) = [e for e in logs if e["event"] == "prefetch.redis_replication_short"]
    assert (short["replicas"], short["acknowledged"]) == (1, 0)
    assert not [e for e in logs if e["event"] == "prefetch.store_unavailable"]


@pytest.mark.redis
async def test_a_long_replica_timeout_is_refused_or_reported_as_a_shortfall(
    cluster: Cluster,
) -> None:
    try:
        RedisStore(cluster.url, lease=3.0, replicas=1, replica_timeout=1.5)
    except ValueError as exc:  # refused at construction: right too
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "replica_timeout" in refused
        return

    async def load() -> str:
        return "v"

    async def run() -> list[MutableMapping[str, Any]]:
        store = RedisStore(cluster.url, lease=3.0, replicas=1, replica_timeout=1.5)
        with capture_logs() as logs:
            async with Prefetcher(store=store) as pf:
                with anyio.fail_after(20):
                    assert await pf.get("k", load) == "v"
        return logs

    logs = await run()
    assert not [e for e in logs if e["event"] == "prefetch.store_unavailable"]
    (short,) = [e for e in logs if e["event"] == "prefetch.redis_replication_short"]
    assert (short["replicas"], short["acknowledged"]) == (1, 0)


@pytest.mark.redis
async def test_cancel_from_another_instance_on_a_cluster(cluster: Cluster) -> None:
    """One instance cancels a load another instance runs: the run is cancelled, the waiters
    of both instances get LoadCancelled, nothing is stored, the key loads again after."""
    started = anyio.Event()
    ended = anyio.Event()
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                ended.set()
        return f"v-{key}"

    other_store = RedisStore(cluster.url, lease=2.0)
    async with (
        Prefetcher(load, store=RedisStore(cluster.url, lease=2.0)) as owner,
        Prefetcher(load, store=other_store) as other,
    ):
        outcomes: list[str] = []

        async def call(pf: Prefetcher[str, str]) -> None:
            try:
                outcomes.append(await pf.get("k"))
            except LoadCancelled:
                outcomes.append("cancelled")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, owner)
                await started.wait()
                tg.start_soon(call, other)
                signals = other_store._redis._signals
                await _until(lambda: signals.waiters() > 0)  # it waits
                assert await other.cancel("k")
                await ended.wait()
            assert outcomes == ["cancelled", "cancelled"]
            assert await other.get("k") == "v-k"
    assert calls == 2


@pytest.mark.redis
async def test_an_application_cluster_client_with_replicas_stays_usable(
    cluster: Cluster,
) -> None:
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[1].port)])
    try:
        store = RedisStore(client, lease=6.0, replicas=1, replica_timeout=0.2)

        async def load(key: int) -> str:
            return f"v{key}"

        with capture_logs():
            async with Prefetcher(load, store=store) as pf:
                assert [await pf.get(i) for i in range(6)] == [f"v{i}" for i in range(6)]
                pools = [c.connection_pool for c in store._redis._node_clients.values()]
                assert pools and not any(p._in_use_connections for p in pools)  # all returned
        assert await client.set("attack:after", b"1")
        assert await client.get("attack:after") == b"1"
        await client.delete("attack:after")
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_call_from_another_thread_is_refused(cluster: Cluster) -> None:
    async def load(key: str) -> str:
        return f"v-{key}"

    async with Prefetcher(load, store=RedisStore(cluster.url, lease=2.0)) as pf:
        assert await pf.get("k") == "v-k"

        def elsewhere() -> None:
            asyncio.run(pf.get("k"))

        with pytest.raises(WrongThreadError):
            await anyio.to_thread.run_sync(elsewhere)
        assert await pf.get("k") == "v-k"  # still usable here


@pytest.mark.redis
async def test_a_sentinel_whose_master_is_down_is_a_store_error_without_the_secret(
    attack_sentinel: SentinelSet,
) -> None:
    attack_sentinel.master.kill()
    url = attack_sentinel.url.replace("://", f"://user:{SECRET}@", 1)
    store = RedisStore(url + "?socket_connect_timeout=0.5", lease=1.0)
    with capture_logs() as logs, pytest.raises(StoreError) as caught:
        async with Prefetcher(store=store):
            pass
    assert "redis+sentinel://user:***@127.0.0.1:" in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in repr(logs)
    assert SECRET not in repr(store)


@pytest.mark.redis
async def test_a_cut_wait_returns_its_connection_to_the_pool(cluster: Cluster) -> None:
    async def load() -> str:
        return "v"

    async def run() -> int:
        store = RedisStore(cluster.url, lease=0.9, replicas=1, replica_timeout=1.0)
        with capture_logs():
            async with Prefetcher(store=store) as pf:
                with anyio.fail_after(20):
                    assert await pf.get("k", load) == "v"
                pools = [c.connection_pool for c in store._redis._node_clients.values()]
                assert pools  # the WAIT went over a node client
                return sum(len(p._in_use_connections) for p in pools)

    try:
        in_use = await run()
    finally:
        _collect_leaked_clients()  # the leaked client: not in another test
    assert in_use == 0


@pytest.mark.redis
async def test_a_wait_cut_by_a_cancellation_returns_its_connection(cluster: Cluster) -> None:
    """The completion's WAIT (no replica: it runs its whole timeout) is cancelled: its
    connection goes back to the node's pool, not leaked (the store bounds the WAIT by any
    deadline it runs under, so this cut is a cancellation without one)."""
    store = RedisStore(cluster.url, lease=30.0, replicas=1, replica_timeout=5.0)
    backend = store._redis
    try:
        async with Prefetcher(store=store):
            for i in range(3):  # three keys, three cut WAITs
                digest = str(i) * 32
                run = Run(token=f"t{i}" * 8, fence=0, started_at=0.0, background=False)
                acquired = await backend.acquire(digest, run, 30.0, force=False, accept=frozenset())
                assert acquired.fence is not None
                outcome = Outcome(
                    ok=True,
                    token=run.token,
                    fence=acquired.fence,
                    started_at=0.0,
                    completed_at=0.0,
                    background=False,
                    payload=b'"v"',
                )
                began = anyio.current_time()
                async with anyio.create_task_group() as tg:  # no deadline: a cancellation
                    tg.start_soon(backend.complete, digest, outcome, None)
                    await anyio.sleep(0.3)
                    tg.cancel_scope.cancel()
                assert anyio.current_time() - began < 2.0  # the 5 s WAIT was cut
            pools = [c.connection_pool for c in backend._node_clients.values()]
            assert pools
            assert sum(len(p._in_use_connections) for p in pools) == 0
    finally:
        _collect_leaked_clients()


@pytest.mark.redis
async def test_the_trailing_progress_reaches_another_instance_on_a_cluster(
    cluster: Cluster,
) -> None:
    """A burst of progress reports (faster than the rate limit): the instance following the
    run over the cluster sees the last one while the run still runs."""
    reported = anyio.Event()
    release = anyio.Event()

    async def load(key: str) -> str:
        for done in range(1, 8):
            report_progress(done, 7, f"step {done}")
        reported.set()
        await release.wait()
        return f"v-{key}"

    async with (
        Prefetcher(load, store=RedisStore(cluster.url, lease=3.0)) as owner,
        Prefetcher(load, store=RedisStore(cluster.url, lease=3.0)) as follower,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(owner.get, "k")
        with anyio.fail_after(15):
            await reported.wait()
            while True:  # the store's record: read until the trailing update lands
                snap = await follower.status("k")
                if snap.progress is not None and snap.progress.done == 7:
                    break
                await anyio.sleep(0.05)
            assert snap.status.name == "RUNNING" and snap.progress.message == "step 7"
            release.set()
            assert await follower.get("k") == "v-k"


@pytest.mark.redis
async def test_one_store_in_two_prefetchers_is_refused_and_reopens_after_close(
    cluster: Cluster,
) -> None:
    store = RedisStore(cluster.url, lease=2.0)

    async def load(key: str) -> str:
        return f"v-{key}"

    async with Prefetcher(load, store=store) as pf:
        assert await pf.get("a") == "v-a"
        with pytest.raises(RuntimeError, match="already open"):
            async with Prefetcher(load, store=store):
                pass
        assert await pf.get("b") == "v-b"  # the first one is unharmed
    assert store._redis.debug_counts() == {"client": 0, "notification reader": 0, "listeners": 0}
    async with Prefetcher(load, store=store) as again:  # closed stores open again
        assert await again.get("a") == "v-a"


replicated = cluster_fixture(name="attack_replicated", masters=3, replicas=1)


@pytest.mark.redis
@pytest.mark.slow
async def test_sigkill_of_the_keys_master_mid_load_runs_it_once(
    attack_replicated: Cluster,
) -> None:
    """The master of a running key's slot is SIGKILLed (its replica has the lease); the
    replica is promoted; the run goes on and completes: one execution, the follower in the
    other instance served, the outcome readable, no lease without an expiry."""
    cluster = attack_replicated
    started = anyio.Event()
    release = anyio.Event()
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return f"v-{key}"

    name = lease_key("prefetch_ingest", "k")
    master = cluster.master_of(name)
    follower_store = RedisStore(cluster.url, lease=6.0)
    async with (
        Prefetcher(load, store=RedisStore(cluster.url, lease=6.0)) as owner,
        Prefetcher(load, store=follower_store) as follower,
        anyio.create_task_group() as tg,
    ):
        results: list[str] = []
        both = anyio.Event()

        async def call(pf: Prefetcher[str, str]) -> None:
            results.append(await pf.get("k"))
            if len(results) == 2:
                both.set()

        with anyio.fail_after(40):
            tg.start_soon(call, owner)
            await started.wait()
            tg.start_soon(call, follower)
            signals = follower_store._redis._signals
            await _until(lambda: signals.waiters() > 0)
            assert master.command("WAIT", "1", "5000") == 1  # the replica has the lease
            master.kill()
            await _until(lambda: cluster.promoted(master), timeout=30)
            release.set()
            await both.wait()
            assert await follower.get("k") == "v-k"
    assert results == ["v-k", "v-k"] and calls == 1
    cluster.check_no_lease_without_expiry()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_replica_reading_cluster_client_never_serves_an_invalidated_value(
    attack_replicated: Cluster,
) -> None:
    """An application's cluster client that reads from replicas: a key invalidated on its
    master is not served again from a replica that lags (CLIENT PAUSE WRITE on it)."""
    cluster = attack_replicated
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        return f"v{calls}"

    name = lease_key("prefetch_ingest", "k")
    master = cluster.master_of(name)
    (replica,) = [
        n
        for n in cluster.live()
        if n.role() == "slave" and int(n.command("ROLE")[2]) == master.port
    ]
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", cluster.nodes[0].port)],
        load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN_REPLICAS,
    )
    served: list[str] = []
    try:
        async with Prefetcher(load, store=RedisStore(client, lease=3.0)) as pf:
            assert await pf.get("k") == "v1"
            assert master.command("WAIT", "1", "5000") == 1
            replica.command("CLIENT", "PAUSE", "4000", "WRITE")  # the replica lags from here
            try:
                assert await pf.invalidate("k")
                with anyio.fail_after(3):
                    for _ in range(2):  # fresh instances: no local copy
                        async with Prefetcher(load, store=RedisStore(client, lease=3.0)) as new:
                            served.append(await new.get("k"))
                replica_gets = replica.command_calls().get("get", 0)
            finally:
                replica.command("CLIENT", "UNPAUSE")
    finally:
        await client.aclose()
    assert "v1" not in served, served
    assert replica_gets == 0  # the store's reads went to the master


async def test_a_tls_client_is_described_as_rediss() -> None:
    client = aioredis.Redis(host="h", port=1, ssl=True)
    plain = aioredis.Redis(host="h", port=1, db=2)
    try:
        assert repr(RedisStore(client)).startswith("RedisStore('rediss://h:1/0'")
        assert repr(RedisStore(plain)).startswith("RedisStore('redis://h:1/2'")
    finally:
        await client.aclose()
        await plain.aclose()


@pytest.mark.redis
async def test_wrong_credentials_on_a_cluster_are_a_store_error_without_the_secret(
    cluster: Cluster,
) -> None:
    url = cluster.url.replace("://", f"://intruder:{SECRET}@", 1)
    store = RedisStore(url + "?socket_connect_timeout=1", lease=1.0)
    with capture_logs() as logs, pytest.raises(StoreError) as caught:
        async with Prefetcher(store=store):
            pass
    text = f"{caught.value} {caught.value.__cause__!r} {logs!r} {store!r}"
    assert "redis+cluster://intruder:***@127.0.0.1:" in str(caught.value)
    assert SECRET not in text
