"""The shared-store contract suite, unchanged, against a real 3-master Redis Cluster.

One cluster serves the module (forming one takes a couple of seconds); every
test starts from empty nodes. An outage is every node stopped and started
again on the same ports with its data on disk (append-only files, and the
cluster's ``nodes.conf``), so the cluster comes back whole, as after a
restart of a persistent cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from prefetch_ingest.redis import RedisStore
from prefetch_ingest.stores.testing import SharedStoreContract, StoreKit
from tests.redis_cluster import Cluster, cluster_fixture

pytestmark = pytest.mark.redis

redis_cluster = cluster_fixture(persistent=True, scope="module")


@pytest.fixture
def fresh_cluster(redis_cluster: Cluster) -> Iterator[Cluster]:
    redis_cluster.flushall()
    yield redis_cluster
    redis_cluster.check_no_lease_without_expiry()


class TestRedisClusterStoreContract(SharedStoreContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def kit(self, fresh_cluster: Cluster) -> StoreKit:
        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            await anyio.to_thread.run_sync(fresh_cluster.stop)
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(fresh_cluster.start)

        def make(**options: Any) -> RedisStore:
            options.setdefault("poll_interval", 0.05)
            return RedisStore(fresh_cluster.url, **options)

        return StoreKit(make=make, outage=outage)
