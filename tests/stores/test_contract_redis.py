"""The shared-store contract suite against a real redis-server (asyncio: redis.asyncio).

An outage is the server stopped and started again on the same port, with its
data on disk (append-only file), so that what was written before it is there
after it, as with a failover or a restart of a persistent Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from prefetch_ingest.redis import RedisStore
from prefetch_ingest.stores.testing import SharedStoreContract, StoreKit
from tests.redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture(persistent=True)


class TestRedisStoreContract(SharedStoreContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def kit(self, redis_server: RedisServer) -> StoreKit:
        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            await anyio.to_thread.run_sync(redis_server.stop)
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(redis_server.start)

        def make(**options: Any) -> RedisStore:
            options.setdefault("poll_interval", 0.05)
            return RedisStore(redis_server.url, **options)

        return StoreKit(make=make, outage=outage)
