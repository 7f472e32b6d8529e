"""The shared-store contract suite against a private PostgreSQL cluster (asyncio: psycopg).

An outage is the cluster stopped (``pg_ctl stop -m fast``: every connection closed) and
started again on the same port with its data, as a restart or a failover would be.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from prefetch_ingest.postgres import PostgresStore
from prefetch_ingest.stores.testing import SharedStoreContract, StoreKit
from tests.postgres_server import PostgresServer, pg_table, postgres_server

__all__ = ["pg_table", "postgres_server"]

pytestmark = pytest.mark.postgres


class TestPostgresStoreContract(SharedStoreContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def kit(self, postgres_server: PostgresServer, pg_table: str) -> StoreKit:
        @contextlib.asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            await anyio.to_thread.run_sync(postgres_server.stop)
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(postgres_server.start)

        def make(**options: Any) -> PostgresStore:
            options.setdefault("poll_interval", 0.05)
            return PostgresStore(postgres_server.dsn, table=pg_table, **options)

        return StoreKit(make=make, outage=outage)
