"""Redis Cluster and Sentinel: URLs, clients, addresses in repr and errors, the WAIT option.

The failovers are in ``tests/test_redis_failover.py``; the contract suite on a
cluster is ``tests/stores/test_contract_redis_cluster.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, StoreError
from prefetch_ingest._redis_connect import parse_multi
from prefetch_ingest.redis import RedisStore, redact

from .redis_cluster import Cluster, SentinelSet, cluster_fixture, sentinel_fixture
from .redis_server import RedisServer, redis_server_fixture
from .test_redis_store import opened, value_of

pytestmark = pytest.mark.anyio

SECRET = "hunter2-s3cret"

redis_cluster = cluster_fixture(scope="module")
replicated_cluster = cluster_fixture(name="replicated_cluster", replicas=1, scope="module")
redis_sentinel = sentinel_fixture()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # RedisStore is asyncio only


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Iterator[Cluster]:
    redis_cluster.flushall()
    yield redis_cluster
    redis_cluster.check_no_lease_without_expiry()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- URLs --------------------------------------------------------------------------------------


def test_sentinel_and_cluster_urls_parse() -> None:
    t = parse_multi("redis+sentinel://u:pw@a:1,b,[::1]:3/mymaster/2?socket_timeout=2.5", "")
    assert (t.hosts, t.service, t.db, t.username, t.password) == (
        [("a", 1), ("b", 26379), ("::1", 3)],
        "mymaster",
        2,
        "u",
        "pw",
    )
    assert t.options == {"socket_timeout": 2.5}
    c = parse_multi("redis+cluster://:pw@h1:7000,h2?max_connections=8", "")
    assert (c.hosts, c.password, c.options) == (
        [("h1", 7000), ("h2", 6379)],
        "pw",
        {"max_connections": 8},
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://a:1",  # no service name
        "redis+sentinel://a:1/m/x",  # bad db
        "redis+sentinel://a:1/m/0/extra",
        "redis+cluster://a:1/0",  # a cluster has no database number
        "redis+cluster://",  # no host
        "redis+cluster://a:99999",
        "redis+cluster://a:1?socket_timeout=-1",
        "redis+cluster://a:1?db=3",  # unknown option
    ],
)
def test_a_bad_sentinel_or_cluster_url_is_a_value_error_without_its_secret(url: str) -> None:
    with_secret = url.replace("://", f"://u:{SECRET}@", 1)
    with pytest.raises(ValueError) as caught:
        RedisStore(with_secret)
    assert SECRET not in str(caught.value)


def test_redact_hides_the_password_of_a_host_list() -> None:
    assert (
        redact(f"redis+sentinel://u:{SECRET}@a:1,b:2/m/0?sentinel_password={SECRET}")
        == "redis+sentinel://u:***@a:1,b:2/m/0?sentinel_password=***"
    )


@pytest.mark.parametrize("scheme", ["redis+cluster", "redis+sentinel"])
async def test_unreachable_sentinel_or_cluster_is_a_store_error_naming_it(scheme: str) -> None:
    port = _closed_port()
    path = "/mymaster" if scheme == "redis+sentinel" else ""
    url = f"{scheme}://u:{SECRET}@127.0.0.1:{port}{path}?socket_connect_timeout=0.5"
    store = RedisStore(url, lease=1.0)
    assert repr(store).startswith(f"RedisStore('{scheme}://u:***@127.0.0.1:{port}")
    with capture_logs() as logs, pytest.raises(StoreError) as caught:
        async with Prefetcher(store=store):
            pass
    assert f"{scheme}://u:***@127.0.0.1:{port}" in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in repr(logs)


# -- a real cluster ----------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_redis_cluster_client_is_used_and_left_open(cluster: Cluster) -> None:
    port = cluster.nodes[0].port
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port)])
    try:
        store = RedisStore(client, lease=2.0)
        assert repr(store).startswith(f"RedisStore('redis+cluster://127.0.0.1:{port}'")
        calls = 0

        async def load(key: int) -> str:
            nonlocal calls
            calls += 1
            return f"v{key}"

        async with Prefetcher(load, store=store) as pf:
            got = [await pf.get(i) for i in range(30)]  # keys in every master's slots
            again = [await pf.get(i) for i in range(30)]
        assert got == again == [f"v{i}" for i in range(30)] and calls == 30
        assert await client.ping()  # not closed by the Prefetcher
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_plain_url_to_a_cluster_node_is_refused_clearly(cluster: Cluster) -> None:
    url = f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    with pytest.raises(ValueError, match=r"a node of a Redis Cluster.*redis\+cluster://"):
        async with Prefetcher(store=RedisStore(url)):
            pass


@pytest.mark.redis
async def test_decode_responses_cluster_client_is_refused(cluster: Cluster) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStore(client)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_wait_for_replicas_on_a_cluster(replicated_cluster: Cluster) -> None:
    """``replicas=1``: the completion waits for the slot's replica; asking for more replicas
    than there are is logged (the value is kept)."""
    async with opened(RedisStore(replicated_cluster.url, replicas=1)) as store:
        with capture_logs() as logs:
            out = await store.load("w1", value_of("v"), background=False, force=False)
        assert out.stored and not [e for e in logs if e["log_level"] == "warning"]
    async with opened(RedisStore(replicated_cluster.url, replicas=2, replica_timeout=0.1)) as s2:
        with capture_logs() as logs:
            out = await s2.load("w2", value_of("v2"), background=False, force=False)
        assert out.stored
        (short,) = [e for e in logs if e["event"] == "prefetch.redis_replication_short"]
        assert (short["replicas"], short["acknowledged"]) == (2, 1)
        entry = await s2.lookup("w2")
        assert entry is not None and entry.value == "v2"
    replicated_cluster.check_no_lease_without_expiry()


# -- a real sentinel set-up ----------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_sentinel_url_and_client_repr_and_wait(redis_sentinel: SentinelSet) -> None:
    ports = ",".join(f"127.0.0.1:{s.port}" for s in redis_sentinel.sentinels)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [("127.0.0.1", s.port) for s in redis_sentinel.sentinels]
    )
    client: aioredis.Redis = sentinel.master_for("mymaster")
    try:
        store = RedisStore(client)
        assert repr(store).startswith(f"RedisStore('redis+sentinel://{ports}/mymaster/0'")
        async with opened(store):
            out = await store.load("s1", value_of("v"), background=False, force=False)
        assert out.stored
    finally:
        await client.aclose()
        for s in sentinel.sentinels:
            await s.aclose()
    async with opened(RedisStore(redis_sentinel.url, replicas=1)) as by_url:
        assert repr(by_url).startswith(f"RedisStore('redis+sentinel://{ports}/mymaster/0'")
        with capture_logs() as logs:
            out = await by_url.load("s2", value_of("v2"), background=False, force=False)
        assert out.stored and not [e for e in logs if e["log_level"] == "warning"]
        entry = await by_url.lookup("s1")
        assert entry is not None and entry.value == "v"


# -- redis-py failing inside itself ----------------------------------------------------------

redis_server = redis_server_fixture()


def _raiser_in(filename: str) -> Callable[..., Any]:
    """A coroutine function whose AttributeError is raised from code in ``filename``."""
    namespace: dict[str, Any] = {}
    code = "async def boom(*args, **kwargs):\n    raise AttributeError('writelines')\n"
    exec(compile(code, filename, "exec"), namespace)
    boom: Callable[..., Any] = namespace["boom"]
    return boom


@pytest.mark.redis
async def test_an_error_inside_redis_py_is_a_store_error_and_others_are_not(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen during a cluster failover: ``AttributeError: 'NoneType' object has no attribute
    'writelines'`` from redis-py's own code. It counts as a connection error (here: a
    ``StoreError`` with it as the cause); the same error from elsewhere is not hidden."""
    inside = os.path.join(os.path.dirname(redis.__file__), "asyncio", "connection.py")
    async with opened(RedisStore(redis_server.url)) as store:
        client = store._redis._client
        assert client is not None
        monkeypatch.setattr(client, "get", _raiser_in(inside))
        with pytest.raises(StoreError) as caught:
            await store.lookup("k", for_get=True)
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        monkeypatch.setattr(client, "get", _raiser_in(__file__))
        with pytest.raises(AttributeError):
            await store.lookup("k", for_get=True)
