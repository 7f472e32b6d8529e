"""The shared-store contract suite against the in-memory backend, on asyncio and trio."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from prefetch_ingest.stores.memory import MemoryServer, MemoryStore
from prefetch_ingest.stores.testing import SharedStoreContract, StoreKit


class TestMemoryStoreContract(SharedStoreContract):
    @pytest.fixture
    def kit(self) -> StoreKit:
        server = MemoryServer()

        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            server.down = True
            try:
                yield
            finally:
                server.down = False

        def make(**options: Any) -> MemoryStore:
            options.setdefault("progress_interval", 0.05)
            return MemoryStore(server, **options)

        return StoreKit(make=make, outage=outage)
